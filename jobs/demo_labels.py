"""The demo's STAND-IN annotation files (no InterPro data ships with any package here, and
there is no network): how jobs/configs/preprocess/demo-labels/*.tsv.gz were made.

- protein2ipr-standin.tsv.gz (protein2ipr format): one "family" per 70%-identity mmseqs2
  cluster of the mmseqs2-examples UniProt sequences (the demo preprocessing's
  clusters/uniref/level-0.7.parquet), spanning each member's whole sequence, so every
  sequence has a label. Ids
  IPR900000 and up are NOT InterPro entries (real ones are far below).
- sites-standin.tsv.gz (the site-features format of `esm3.data.interpro`): matches of
  three real PROSITE patterns (P-loop PS00017, cAMP/cGMP kinase site PS00004, RGD PS00016)
  found here by regular expression, not InterPro's site annotations.
- entry-standin.list (InterPro's entry.list format, after "#" lines saying what it is):
  every stand-in family (as entry.list lists every InterPro entry), each named by its
  cluster representative's UniProt
  protein name from the FASTA header (real text, e.g. "Genome polyprotein"), so the
  function token tables (`esm3.data.function_keywords`) have keywords to hash. Not InterPro
  entries or names.

All are deterministic functions of those inputs:
  python -m jobs.demo_labels FASTA CLUSTERS OUT_DIR
and the entry list alone from the family file already made:
  python -m jobs.demo_labels --entries FASTA OUT_DIR
"""

from __future__ import annotations

import gzip
import re
import sys
from collections import defaultdict
from pathlib import Path

import pyarrow.parquet as pq

from esm3.data.function_keywords import ENTRY_COLUMNS

FIRST_STANDIN_ID = 900_000
SITE_PATTERNS = {  # PROSITE accession: (pattern as a regular expression, description)
    "PS00017": ("[AG].{4}GK[ST]", "ATP/GTP-binding site motif A (P-loop)"),
    "PS00004": ("[RK]{2}.[ST]", "cAMP- and cGMP-dependent protein kinase phosphorylation site"),
    "PS00016": ("RGD", "Cell attachment sequence"),
}
HEADER = "# STAND-IN labels for the demo, NOT InterPro data: {what}; made by jobs/demo_labels.py\n"


def read_fasta(path: Path) -> dict[str, str]:
    """accession -> sequence of a UniProt FASTA (`sp|P12345|NAME ...` headers)."""
    seqs: dict[str, list[str]] = {}
    acc = ""
    with gzip.open(path, "rt") as f:
        for line in f:
            if line.startswith(">"):
                head = line[1:].split()[0]
                acc = head.split("|")[1] if head.count("|") >= 2 else head
                seqs[acc] = []
            else:
                seqs[acc].append(line.strip())
    return {k: "".join(v) for k, v in seqs.items()}


def families(clusters: Path, min_members: int = 1) -> list[tuple[str, list[str]]]:
    """(representative, members) of clusters with at least `min_members`, largest first,
    then by representative: the order gives the stand-in ids."""
    t = pq.read_table(clusters, columns=["representative", "member"])
    groups: dict[str, list[str]] = defaultdict(list)
    for rep, mem in zip(t["representative"].to_pylist(), t["member"].to_pylist(), strict=True):
        groups[rep].append(mem)
    keep = [(r, sorted(m)) for r, m in groups.items() if len(m) >= min_members]
    return sorted(keep, key=lambda x: (-len(x[1]), x[0]))


def read_names(path: Path) -> dict[str, str]:
    """accession -> protein name of a UniProt FASTA (the header text before " OS=")."""
    names = {}
    with gzip.open(path, "rt") as f:
        for line in f:
            if line.startswith(">"):
                head, _, rest = line[1:].rstrip("\n").partition(" ")
                acc = head.split("|")[1] if head.count("|") >= 2 else head
                names[acc] = rest.split(" OS=")[0].strip()
    return names


def entry_rows(family_file: Path, names: dict[str, str]) -> list[tuple[str, str, str]]:
    """(stand-in id, "Family", representative's protein name) of every family in the
    protein2ipr stand-in, by id."""
    members: dict[str, int] = defaultdict(int)
    rep_of = {}
    with gzip.open(family_file, "rt") as f:
        for line in f:
            if not line.startswith("#"):
                _, ipr, _, rep, *_ = line.split("\t")
                members[ipr] += 1
                rep_of[ipr] = rep.removeprefix("STANDIN:")
    return [(ipr, "Family", names[rep_of[ipr]]) for ipr in sorted(members)]


def write_entry_list(path: Path, rows: list[tuple[str, str, str]]) -> None:
    lines = ["\t".join(ENTRY_COLUMNS)] + ["\t".join(r) for r in rows]
    what = "every family, named by its representative's UniProt protein name"
    path.write_text(HEADER.format(what=what) + "\n".join(lines) + "\n", encoding="utf-8")


def family_lines(seqs: dict[str, str], fams: list[tuple[str, list[str]]]) -> list[str]:
    lines = []
    for k, (rep, members) in enumerate(fams):
        ipr = f"IPR{FIRST_STANDIN_ID + k:06d}"
        name = f"Stand-in family {k} (70% cluster of {rep}, {len(members)} members)"
        lines += [f"{m}\t{ipr}\t{name}\tSTANDIN:{rep}\t1\t{len(seqs[m])}"
                  for m in members if m in seqs]  # fmt: skip
    return sorted(lines)


def site_lines(seqs: dict[str, str]) -> list[str]:
    lines = []
    for acc in sorted(seqs):
        for label, (pattern, desc) in SITE_PATTERNS.items():
            for m in re.finditer(f"(?=({pattern}))", seqs[acc]):
                s = m.start() + 1
                lines.append(f"{acc}\t{label}\t{desc}\t{s}\t{s + len(m.group(1)) - 1}")
    return lines


def write_gz(path: Path, header: str, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # mtime 0: the same inputs give the same bytes
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
        gz.write((header + "\n".join(lines) + "\n").encode())


def entries_main(fasta: str, out_dir: str) -> None:
    out = Path(out_dir)
    rows = entry_rows(out / "protein2ipr-standin.tsv.gz", read_names(Path(fasta)))
    write_entry_list(out / "entry-standin.list", rows)


def main(fasta: str, clusters: str, out_dir: str) -> None:
    seqs = read_fasta(Path(fasta))
    fams = families(Path(clusters))
    out = Path(out_dir)
    write_gz(out / "protein2ipr-standin.tsv.gz",
             HEADER.format(what="families = mmseqs2 70% clusters, ids IPR900000+"),
             family_lines(seqs, fams))  # fmt: skip
    write_gz(out / "sites-standin.tsv.gz",
             HEADER.format(what="sites = PROSITE pattern matches by regular expression"),
             site_lines(seqs))  # fmt: skip
    entries_main(fasta, out_dir)


if __name__ == "__main__":
    if sys.argv[1] == "--entries":
        entries_main(*sys.argv[2:4])
    else:
        main(*sys.argv[1:4])
