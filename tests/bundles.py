"""Inputs shaped as the databases publish them, made by the tests from real data: OAS data
units (a CSV-quoted JSON metadata line, then an AIRR CSV with OAS's extra columns), JGI/IMG
genome tarballs (`<taxon_oid>/<taxon_oid>.genes.faa` beside nucleotide and annotation
files) and AFDB-style tar bundles of gzipped structure files."""

from __future__ import annotations

import csv
import gzip
import io
import json
import tarfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import biotite.structure as bs
import biotite.structure.io.pdb as pdb
import numpy as np

from esm3.data.structures.io import read_structure

# the columns of an unpaired OAS unit, in OAS's order (shared with the scale benchmark)
from jobs.bench.synthetic import OAS_UNPAIRED_COLUMNS as OAS_COLUMNS

PAIRED_COLUMNS = (
    ["sequence_id_heavy"]
    + [f"{c}_heavy" for c in OAS_COLUMNS]
    + ["sequence_id_light"]
    + [f"{c}_light" for c in OAS_COLUMNS]
    + ["Isotype_heavy", "Isotype_light"]
)


def oas_metadata(run: str, chain: str, isotype: str, **extra: object) -> dict:
    """A unit's metadata object with OAS's keys."""
    return {
        "Run": run, "Link": "https://doi.org/10.1016/j.celrep.2019.06.016",
        "Author": "Nielsen et al., 2019", "Species": "human", "Age": 35, "BSource": "PBMC",
        "BType": "Memory-B-Cells", "Vaccine": "None", "Disease": "None", "Subject": "Donor-2",
        "Longitudinal": "no", "Unique sequences": 0, "Isotype": isotype, "Chain": chain,
        "Total sequences": 0, **extra,
    }  # fmt: skip


def _airr_row(seq: str, locus: str) -> dict:
    """One chain's AIRR values around the amino-acid sequence `seq` (text fields with
    commas and quotes, as ANARCI's numbering has, so the CSV quoting is exercised)."""
    cdr3 = seq[-12:-4] if len(seq) > 16 else seq
    return {
        "sequence": "CAGGTGCAGCTGGTGCAGTCTGGG" * 3, "locus": locus, "stop_codon": "F",
        "vj_in_frame": "T", "v_frameshift": "F", "productive": "T", "rev_comp": "F",
        "complete_vdj": "F", "v_call": f"{locus}V3-23*01", "d_call": "", "j_call": f"{locus}J4*02",
        "sequence_alignment_aa": seq, "germline_alignment_aa": seq, "cdr3_aa": cdr3,
        "junction_aa": f"C{cdr3}W", "junction_aa_length": str(len(cdr3) + 2),
        "v_identity": "0.9876", "Redundancy": "1",
        "ANARCI_numbering": "{'fwh1': {'1 ': '" + seq[:1] + "', '2 ': '" + seq[1:2] + "'}, "
        "'cdrh3': {'105 ': 'A', '111A': 'R'}}",
        "ANARCI_status": "|Deletions: 10, 73||Missing Conserved Cysteine: 23|",
    }  # fmt: skip


def write_oas_unit(path: Path, meta: dict, columns: Sequence[str], rows: Iterable[dict]) -> Path:
    """A data unit as OAS writes it: gzip CSV whose first line is the metadata JSON as one
    quoted CSV field, the second the header; missing values empty."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([json.dumps(meta)])
    w.writerow(columns)
    for r in rows:
        w.writerow([r.get(c, "") for c in columns])
    path.write_bytes(gzip.compress(buf.getvalue().encode()))
    return path


def unpaired_unit(path: Path, meta: dict, sequences: Sequence[str]) -> Path:
    locus = "IGH" if meta["Chain"] == "Heavy" else "IGK"
    return write_oas_unit(path, meta, OAS_COLUMNS, [_airr_row(s, locus) for s in sequences])


def paired_unit(path: Path, meta: dict, pairs: Sequence[tuple[str, str]], isotypes=None) -> Path:
    rows = []
    for i, (h, lt) in enumerate(pairs):
        row = {f"{k}_heavy": v for k, v in _airr_row(h, "IGH").items()}
        row |= {f"{k}_light": v for k, v in _airr_row(lt, "IGK").items()}
        row |= {"sequence_id_heavy": f"AAACCTG-{i}_contig_1",
                "sequence_id_light": f"AAACCTG-{i}_contig_2",
                "Isotype_heavy": (isotypes or ["IGHG"] * len(pairs))[i], "Isotype_light": ""}  # fmt: skip
        rows.append(row)
    return write_oas_unit(path, meta, PAIRED_COLUMNS, rows)


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 1_700_000_000
    tar.addfile(info, io.BytesIO(data))


def img_genes_faa(taxon_oid: int, organism: str, records: Sequence[tuple[str, str]]) -> bytes:
    """IMG's protein FASTA of a genome: `>gene_oid product [organism]`, stop codons kept."""
    return "".join(
        f">{taxon_oid + i + 1} {desc} [{organism}]\n{seq}*\n"
        for i, (desc, seq) in enumerate(records)
    ).encode()


def jgi_tarball(path: Path, genomes: dict[int, tuple[str, list[tuple[str, str]]]]) -> Path:
    """A JGI/IMG download: per genome `<oid>/<oid>.genes.faa` with `.genes.fna`, `.gff` and
    a COG table beside it; several genomes may share one tarball."""
    with tarfile.open(path, "w:gz") as tar:
        for oid, (organism, records) in genomes.items():
            add_member(tar, f"{oid}/{oid}.genes.fna", b">1 nt\nATGAAACGC\n")
            add_member(tar, f"{oid}/{oid}.genes.faa", img_genes_faa(oid, organism, records))
            add_member(tar, f"{oid}/{oid}.gff", b"##gff-version 3\n")
            add_member(tar, f"{oid}/{oid}.cog.tab.txt", b"gene_oid\tcog_id\n")
    return path


def predicted_pdb(src: Path, plddt: float = 90.0) -> bytes:
    """A predicted-structure file (PDB text) made from a real structure: its protein chains
    with pLDDT `plddt` in the B-factor column, as AFDB writes it."""
    chains = []
    for ch in read_structure(src).chains:
        atoms = ch.atoms.copy()
        atoms.b_factor = np.full(atoms.array_length(), plddt, dtype=np.float32)
        chains.append(atoms)
    f = pdb.PDBFile()
    f.set_structure(bs.concatenate(chains) if len(chains) > 1 else chains[0])
    out = io.StringIO()
    f.write(out)
    return out.getvalue().encode()


def afdb_bundle(path: Path, members: Sequence[tuple[str, bytes]], plain_dir: Path | None = None):
    """An AFDB-style uncompressed tar of (name, bytes) members; with `plain_dir` the same
    files are also written there (for comparison). Returns the plain files' paths."""
    plain = []
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            add_member(tar, name, data)
            if plain_dir is not None:
                p = plain_dir / name
                p.write_bytes(data)
                plain.append(p)
    return plain
