"""Inputs of the scale benchmark (bench_scale), shaped as the databases publish them and
written chunk by chunk, so that the generator's memory does not grow with the size:

- UniRef90 FASTA.gz: `>UniRef90_<acc> <name> n=<k> Tax=<taxon> TaxID=<id> RepID=<entry>`
  headers, sequences wrapped at 60 residues; a share of the records are mutated copies of
  others (~90% identity), so clustering and the purge search find real neighbours;
- OAS data units: the metadata JSON as one quoted CSV field, then the AIRR header and rows;
- ESMAtlas metadata: `id` (MGYP + 12 digits), `plddt`, `ptm` (0-1) as Parquet or CSV;
- InterPro protein2ipr.dat.gz: accession, IPR id, name, signature, start, end (tab-separated,
  sorted by accession, as InterPro ships it);
- AFDB-style tar bundles of real structures (MDAnalysisTests), repeated under distinct
  member names.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from jobs.bench.synthetic import (
    OAS_UNPAIRED_COLUMNS,
    draw_lengths,
    draw_sequences,
    record_ids,
    residue_table,
)

CHUNK = 50_000  # records generated per step: the generator's memory
LINE = 60  # residues per FASTA line, as UniProt writes them
RELATIVES, MUTATED = 0.2, 0.1  # share of records copied from another, share of residues changed
TAXA = (
    ("Homo sapiens", 9606, "HUMAN"), ("Mus musculus", 10090, "MOUSE"),
    ("Escherichia coli", 562, "ECOLX"), ("Saccharomyces cerevisiae", 4932, "YEAST"),
    ("Arabidopsis thaliana", 3702, "ARATH"), ("Bacillus subtilis", 1423, "BACSU"),
    ("Drosophila melanogaster", 7227, "DROME"),
)  # fmt: skip
NAMES = (
    "Uncharacterized protein", "ABC transporter ATP-binding protein",
    "DNA-directed RNA polymerase subunit beta", "Putative membrane protein",
    "50S ribosomal protein L2", "Histidine kinase", "Glutathione S-transferase",
)  # fmt: skip
# ~ structures per structure member: 5PTI kept (58 residues), 1YJP rejected (too few contacts)
STRUCTURE_TEMPLATES = ("mmcif/5PTI.cif.gz", "mmcif/5PTI.cif.gz", "mmcif/5PTI.cif.gz",
                       "mmcif/1YJP.cif.gz")  # fmt: skip


def _chunks(n: int) -> Iterator[tuple[int, int]]:
    for lo in range(0, n, CHUNK):
        yield lo, min(lo + CHUNK, n)


def accessions(rows: np.ndarray) -> list[str]:
    """UniProt-like accessions (A0A + 7 hex digits) of record rows."""
    return [f"A0A{int(r):07X}" for r in rows]


def _with_relatives(rng: np.random.Generator, seqs: list[str], table: np.ndarray) -> None:
    """Replace a share of the sequences by mutated copies of others of the chunk."""
    n = len(seqs)
    for i in rng.choice(n, int(n * RELATIVES), replace=False):
        codes = np.frombuffer(seqs[int(rng.integers(n))].encode(), dtype=np.uint8).copy()
        hit = rng.random(len(codes)) < MUTATED
        codes[hit] = table[rng.integers(0, len(table), int(hit.sum()))]
        seqs[i] = codes.tobytes().decode()


def _fasta_record(acc: str, seq: str, rng: np.random.Generator) -> str:
    taxon, taxid, mnemonic = TAXA[int(rng.integers(len(TAXA)))]
    name = NAMES[int(rng.integers(len(NAMES)))]
    members = min(int(rng.zipf(2.0)), 5000)
    lines = "\n".join(seq[i : i + LINE] for i in range(0, len(seq), LINE))
    return (f">UniRef90_{acc} {name} n={members} Tax={taxon} TaxID={taxid} "
            f"RepID={acc}_{mnemonic}\n{lines}\n")  # fmt: skip


def write_uniref_fasta(path: Path, n: int, seed: int = 0) -> Path:
    """n UniRef90-like records as FASTA.gz."""
    rng, table = np.random.default_rng(seed), residue_table()
    with gzip.open(path, "wt", compresslevel=1) as f:
        for lo, hi in _chunks(n):
            seqs = draw_sequences(rng, draw_lengths(rng, hi - lo), table).to_pylist()
            _with_relatives(rng, seqs, table)
            f.write("".join(_fasta_record(a, s, rng)
                            for a, s in zip(accessions(np.arange(lo, hi)), seqs, strict=True)))  # fmt: skip
    return path


# --- OAS ---------------------------------------------------------------------------------


def oas_metadata(run: str, n: int) -> dict:
    """A unit's metadata object with OAS's keys."""
    return {
        "Run": run, "Link": "https://doi.org/10.1016/j.celrep.2019.06.016",
        "Author": "Nielsen et al., 2019", "Species": "human", "Age": 35, "BSource": "PBMC",
        "BType": "Memory-B-Cells", "Vaccine": "None", "Disease": "None", "Subject": "Donor-2",
        "Longitudinal": "no", "Unique sequences": n, "Isotype": "IGHG", "Chain": "Heavy",
        "Total sequences": n,
    }  # fmt: skip


def _oas_rows(rng: np.random.Generator, n: int, table: np.ndarray) -> object:
    """n unpaired heavy-chain rows: AIRR values around a V(D)J amino-acid sequence of ~120
    residues; the ANARCI numbering has commas and quotes, so the CSV quoting is exercised."""
    import pyarrow as pa
    import pyarrow.compute as pc

    lengths = np.clip(np.rint(rng.normal(120, 6, n)), 90, 150).astype(np.int32)
    aa = draw_sequences(rng, lengths, table)
    cdr3 = pc.utf8_slice_codeunits(aa, -16, -4)

    def const(v: str) -> pa.Array:
        return pa.array(np.full(n, v, dtype=object), pa.string())

    filled = {
        "sequence": const("CAGGTGCAGCTGGTGCAGTCTGGG" * 15), "locus": const("IGH"),
        "stop_codon": const("F"), "vj_in_frame": const("T"), "productive": const("T"),
        "v_call": const("IGHV3-23*01"), "j_call": const("IGHJ4*02"),
        "sequence_alignment_aa": aa, "germline_alignment_aa": aa, "cdr3_aa": cdr3,
        "junction_aa": pc.binary_join_element_wise("C", cdr3, "W", ""),
        "v_identity": const("0.9876"), "Redundancy": const("1"),
        "ANARCI_numbering": const("{'fwh1': {'1 ': 'E', '2 ': 'V'}, 'cdrh3': {'105 ': 'A'}}"),
        "ANARCI_status": const("|Deletions: 10, 73||Missing Conserved Cysteine: 23|"),
    }  # fmt: skip
    empty = pa.nulls(n, pa.string())
    return pa.table({c: filled.get(c, empty) for c in OAS_UNPAIRED_COLUMNS})


def write_oas_unit(path: Path, n: int, seed: int = 0) -> Path:
    """An unpaired OAS data unit (`<run>_1_Heavy_IGHG.csv.gz`) of n rows under `path`."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    rng, table = np.random.default_rng(seed), residue_table()
    head = json.dumps(oas_metadata(path.name.split("_")[0], n)).replace('"', '""')
    with pa.CompressedOutputStream(str(path), "gzip") as out:
        out.write(f'"{head}"\n{",".join(OAS_UNPAIRED_COLUMNS)}\n'.encode())
        for lo, hi in _chunks(n):
            pacsv.write_csv(_oas_rows(rng, hi - lo, table), out,
                            pacsv.WriteOptions(include_header=False))  # fmt: skip
    return path


# --- ESMAtlas metadata -------------------------------------------------------------------


def esmatlas_ids(rows: np.ndarray) -> object:
    return record_ids(rows, prefix="MGYP", width=12)


def write_esmatlas_metadata(path: Path, n: int, seed: int = 0) -> Path:
    """n rows (id, plddt, ptm) in id order; Parquet or CSV by the suffix."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    schema = pa.schema([("id", pa.string()), ("plddt", pa.float64()), ("ptm", pa.float64())])
    csv = path.suffix == ".csv"
    writer = pacsv.CSVWriter(path, schema) if csv else pq.ParquetWriter(path, schema)
    with writer:
        for lo, hi in _chunks(n):
            plddt = np.round(rng.beta(6, 2, hi - lo), 4)
            ptm = np.round(np.clip(plddt - rng.uniform(0, 0.2, hi - lo), 0, 1), 4)
            writer.write_table(pa.table([esmatlas_ids(np.arange(lo, hi)), plddt, ptm],
                                        schema=schema))  # fmt: skip
    return path


# --- InterPro ----------------------------------------------------------------------------


def _protein2ipr_rows(rng: np.random.Generator, first: int, lines: int) -> object:
    """`lines` rows of proteins numbered from `first`, 1-7 matches each, sorted by accession."""
    import pyarrow as pa

    per = rng.integers(1, 8, lines)
    protein = first + np.repeat(np.arange(lines), per)[:lines]
    ipr = rng.integers(1, 50_000, lines)
    start = rng.integers(1, 400, lines)
    return pa.table({
        "accession": accessions(protein),
        "ipr": [f"IPR{int(i):06d}" for i in ipr],
        "name": [NAMES[int(i) % len(NAMES)] + " domain" for i in ipr],
        "signature": [f"PF{int(i) % 20_000:05d}" for i in ipr],
        "start": start, "end": start + rng.integers(20, 300, lines),
    })  # fmt: skip


def write_protein2ipr(path: Path, n: int, seed: int = 0) -> Path:
    """n lines of protein2ipr.dat.gz."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    rng = np.random.default_rng(seed)
    options = pacsv.WriteOptions(include_header=False, delimiter="\t", quoting_style="none")
    with pa.CompressedOutputStream(str(path), "gzip") as out:
        for lo, hi in _chunks(n):
            pacsv.write_csv(_protein2ipr_rows(rng, lo, hi - lo), out, options)
    return path


# --- structures --------------------------------------------------------------------------


def mda_data() -> Path | None:
    """MDAnalysisTests' folder of real PDB/mmCIF files, None when it is not installed."""
    spec = importlib.util.find_spec("MDAnalysisTests")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def write_structure_bundle(path: Path, n: int, templates: list[Path]) -> Path:
    """An AFDB-style uncompressed tar of n members `AF-<acc>-F1-model_v4.pdb`, cycling over
    the template files."""
    with tarfile.open(path, "w") as tar:
        for i, acc in enumerate(accessions(np.arange(n))):
            tar.add(templates[i % len(templates)], arcname=f"AF-{acc}-F1-model_v4.pdb")
    return path
