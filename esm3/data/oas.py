"""OAS data units into Parquet sequence shards, streamed with bounded memory.

The Observed Antibody Space publishes "data units", not FASTA: one `.csv.gz` per sequencing
run (and chain/isotype for unpaired data), e.g. `SRR9179275_1_Heavy_IGHG.csv.gz` (unpaired)
or `1279049_1_Paired_All.csv.gz` (paired). What this reader relies on, as OAS's bulk download
files are written and as its documentation and users' parsers read them (the first line read
with `json.loads` once the CSV quoting is undone, the table read with `header=1`):

- line 1: the unit's metadata, a JSON object written as one CSV-quoted field
  (`"{""Run"": ""SRR..."", ""Link"": ..., ""Author"": ""Nielsen et al., 2019"", ...}"`), with
  keys Run, Link, Author, Species, Age, BSource, BType, Vaccine, Disease, Subject,
  Longitudinal, Unique sequences, Isotype, Chain (Heavy, Light or Paired), Total sequences;
  a bare (unquoted) JSON line is read too;
- line 2: the CSV header, AIRR rearrangement columns (sequence, locus, v_call, ...,
  sequence_alignment_aa, ..., cdr3_aa, ...) then OAS/ANARCI ones (Redundancy,
  ANARCI_numbering, ANARCI_status); paired units have the same columns suffixed `_heavy`
  and `_light` (sequence_alignment_aa_heavy, ..., and in most units Isotype_heavy/_light);
- then one row per sequence (paired: per heavy/light pair).

Records: the amino-acid sequence is `sequence_alignment_aa` (the V(D)J region as aligned and
translated), checked like FASTA records (`esm3.data.fasta.parse_block`: alphabet, lowercase,
one terminal stop removed; `rejects` rows for the rest).

Paired units give two records per row, heavy then light, ids `<unit>:<row>:heavy` and
`<unit>:<row>:light`, not one record joining both chains: the pipeline clusters, purges and
samples single chains (the paper clusters OAS at 95% per chain), and training's corruption
builds its chains from one sequence per record (its chainbreak token separates pseudo-chains
cut by augmentation; `Protein.chain_ids` of a record are not used), so a joined record would
train the pair as one chain. The pair stays recoverable: same `unit` and `row`, `chain`
Heavy/Light.

Columns: `SEQUENCE_SCHEMA` (id `<unit>:<row>` for unpaired units, unit = the file name without
`.csv.gz`, row = the 0-based data row, so ids are unique across units; taxon = Species;
offset = the record's index in the unit: the row, or 2 * row (+1 for light) when paired),
then `OAS_COLUMNS`: unit, row, chain, species, isotype (the row's Isotype_heavy/_light when
the unit has them, else the unit's Isotype), study (Author), run (Run).

Bad units become `rejects` rows and an empty shard, so the other units' tasks and the stages
after them go on: ``bad_metadata`` (first line not a JSON object), ``missing_column`` (no
sequence_alignment_aa, nor both _heavy and _light), ``empty_unit``. A unit whose gzip data or
CSV breaks is an `OasError` naming the file, as for FASTA: no shard is written.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from esm3.data.fasta import (
    SEQUENCE_SCHEMA,
    _rejects_path,
    parse_block,
    read_rejects,
    write_rejects,
)
from esm3.data.shards import ShardWriter, is_done

OAS_COLUMNS = [
    ("unit", pa.string()),  # the data unit's file name without .csv(.gz)
    ("row", pa.int64()),  # 0-based data row in the unit
    ("chain", pa.string()),  # Heavy | Light
    ("species", pa.string()),
    ("isotype", pa.string()),
    ("study", pa.string()),  # the metadata's Author, e.g. "Nielsen et al., 2019"
    ("run", pa.string()),  # the metadata's Run (SRA run or study's own id)
]
OAS_SCHEMA = pa.schema(list(SEQUENCE_SCHEMA) + [pa.field(n, t) for n, t in OAS_COLUMNS])
UNPAIRED = "sequence_alignment_aa"
CHAINS = (("heavy", "Heavy"), ("light", "Light"))
DEFAULT_BLOCK_BYTES = 16 << 20  # CSV bytes per parsed batch: memory follows this


class OasError(ValueError):
    """The unit's file cannot be read (corrupt gzip, broken CSV); names the file."""


def unit_name(path: str | Path) -> str:
    """`SRR123_1_Heavy_IGHG.csv.gz` -> `SRR123_1_Heavy_IGHG`."""
    name = Path(path).name
    for ext in (".gz", ".csv"):
        name = name.removesuffix(ext)
    return name


def _open_text(path: Path) -> io.TextIOBase:
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    raw = gzip.open(path, "rb") if gz else open(path, "rb")  # noqa: SIM115
    return io.TextIOWrapper(raw, encoding="utf-8", errors="replace", newline="")


def read_unit_head(path: str | Path) -> tuple[dict | None, list[str], str]:
    """(metadata or None, CSV header columns, problem or "") from a unit's first two lines."""
    path = Path(path)
    try:
        with _open_text(path) as f:
            first, second = f.readline(), f.readline()
    except (OSError, EOFError) as e:
        raise OasError(f"{path}: corrupt or unreadable data unit: {e}") from e
    if not first.strip():
        return None, [], "empty_unit"
    line = first.strip()
    try:
        text = next(csv.reader([line]))[0] if line.startswith('"') else line
        meta = json.loads(text)
    except (ValueError, IndexError, csv.Error):
        meta = None
    if not isinstance(meta, dict):
        return None, [], "bad_metadata"
    header = next(csv.reader([second.strip("\r\n")]), []) if second.strip() else []
    return meta, header, ""


def _reject(path: Path, reason: str, detail: str) -> dict:
    return {"stage": "ingest", "source": str(path), "record": unit_name(path), "reason": reason,
            "detail": detail}  # fmt: skip


def ingest_oas(
    path: str | Path,
    out: str | Path,
    *,
    dataset: str,
    lowercase: Literal["upper", "reject"] = "upper",
    block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> tuple[dict, list[dict]]:
    """Ingest one OAS data unit (unpaired or paired) into the Parquet shard `out`.

    One array task's unit of work, like `esm3.data.fasta.ingest_fasta`: idempotent, the shard
    (schema `OAS_SCHEMA`, rows in unit order) and its `<out>.rejects.parquet` appear only when
    complete. Returns (summary counts, reject rows). Raises OasError for a corrupt file.
    """
    path, out = Path(path), Path(out)
    if is_done(out) and _rejects_path(out).exists():
        summary, rejects = read_rejects(out)
        return {**summary, "skipped": True}, rejects
    unit = unit_name(path)
    counts = dict(records=0, rows=0, lowercased=0, stop_removed=0)
    rejects: list[dict] = []
    meta, header, problem = read_unit_head(path)
    paired = False
    if not problem:
        if UNPAIRED in header:
            columns = [UNPAIRED]
        elif all(f"{UNPAIRED}_{c}" in header for c, _ in CHAINS):
            paired = True
            columns = [f"{UNPAIRED}_{c}" for c, _ in CHAINS]
            columns += [f"Isotype_{c}" for c, _ in CHAINS if f"Isotype_{c}" in header]
        else:
            problem = "missing_column"
    with ShardWriter(out, OAS_SCHEMA) as writer:
        if problem:
            detail = {
                "empty_unit": "the file is empty",
                "bad_metadata": "the first line is not a JSON object (OAS unit metadata)",
                "missing_column": f"no column {UNPAIRED!r} (nor {UNPAIRED}_heavy and _light); "
                f"the header has {len(header)} column(s): {', '.join(header[:8])}"
                + (" ..." if len(header) > 8 else ""),
            }[problem]
            rejects.append(_reject(path, problem, detail))
        else:
            assert meta is not None
            const = {
                "source": str(path),
                "unit": unit,
                "species": _text(meta.get("Species")),
                "isotype": _text(meta.get("Isotype")),
                "study": _text(meta.get("Author")),
                "run": _text(meta.get("Run")),
                "chain": _text(meta.get("Chain")),
            }
            row0 = 0
            for batch in _batches(path, header, columns, block_bytes):
                table = _records(batch, row0, paired, const, dataset, lowercase, counts, rejects)
                writer.write(table)
                row0 += batch.num_rows
            counts["rows"] = row0
    summary = {
        "source": str(path),
        "dataset": dataset,
        "shard": str(out),
        "unit": unit,
        "paired": paired,
        **counts,
        "written": writer.rows,
        "rejected": len(rejects),
        "skipped": False,
    }
    write_rejects(out, summary, rejects)
    return summary, rejects


def _text(v: object) -> str | None:
    return None if v is None or v == "" else str(v)


def _batches(path: Path, header: list[str], columns: list[str], block_bytes: int):  # type: ignore[no-untyped-def]
    """The unit's data rows, `columns` only (strings, "" where empty), batch by batch."""
    raw = pa.OSFile(str(path))
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    stream = pa.CompressedInputStream(raw, "gzip") if gz else raw
    try:
        reader = pacsv.open_csv(
            stream,
            read_options=pacsv.ReadOptions(
                skip_rows=2, column_names=header, block_size=block_bytes
            ),  # fmt: skip
            convert_options=pacsv.ConvertOptions(
                include_columns=columns,
                column_types={c: pa.string() for c in columns},
                strings_can_be_null=False,
            ),
        )
        while True:
            try:
                batch = reader.read_next_batch()
            except StopIteration:
                return
            yield batch
    except (OSError, pa.ArrowInvalid, EOFError) as e:
        raise OasError(f"{path}: corrupt or truncated data unit: {e}") from e
    finally:
        stream.close()


def _records(batch, row0, paired, const, dataset, lowercase, counts, rejects) -> pa.Table:  # type: ignore[no-untyped-def]
    """One batch of unit rows -> checked records with the OAS columns."""
    n = batch.num_rows
    rows = np.arange(row0, row0 + n, dtype=np.int64)
    row_str = pa.array(rows.astype(str))
    unit_isotype = pa.scalar(const["isotype"], pa.string())
    if paired:  # heavy, light, heavy, light, ...: record k of row r has offset 2r + k
        ids, seqs, chain, isotype = [], [], [], []
        for suffix, name in CHAINS:
            ids.append(pc.binary_join_element_wise(const["unit"], row_str, suffix, ":"))
            seqs.append(batch.column(f"{UNPAIRED}_{suffix}"))
            chain.append(pa.repeat(pa.scalar(name), n))
            col = f"Isotype_{suffix}"
            isotype.append(
                pc.if_else(pc.equal(batch.column(col), ""), unit_isotype, batch.column(col))
                if col in batch.schema.names
                else pa.repeat(unit_isotype, n)
            )
        take = pa.array(np.arange(2 * n).reshape(2, n).T.reshape(-1))

        def weave(arrays: list[pa.Array]) -> pa.Array:
            return pa.concat_arrays(arrays).take(take)

        ids, seqs, chain, isotype = weave(ids), weave(seqs), weave(chain), weave(isotype)
        offsets = np.arange(2 * row0, 2 * (row0 + n), dtype=np.int64)
        rec_rows = offsets // 2
    else:
        ids = pc.binary_join_element_wise(const["unit"], row_str, ":")
        seqs = batch.column(UNPAIRED)
        chain = pa.repeat(pa.scalar(const["chain"], pa.string()), n)
        isotype = pa.repeat(unit_isotype, n)
        offsets = rec_rows = rows
    if len(ids) == 0:
        return OAS_SCHEMA.empty_table()
    # the FASTA checks (esm3.data.fasta.parse_block) on a FASTA rendering of the batch
    text = pc.binary_join_element_wise(">", ids, "\n", pc.fill_null(seqs, ""), "\n", "")
    ends = np.cumsum(pc.binary_length(text).to_numpy(zero_copy_only=False))
    starts = np.concatenate([[0], ends[:-1]])
    parsed = parse_block(_bytes(text), 0, dataset=dataset, source=const["source"],
                         header_format="plain", lowercase=lowercase)  # fmt: skip
    counts["records"] += parsed.records
    counts["lowercased"] += parsed.lowercased
    counts["stop_removed"] += parsed.stop_removed
    for r in parsed.rejects:  # name the unit's data row, not the rendering's byte
        detail, at = r["detail"].rsplit("; record at byte ", 1)
        detail = "empty sequence_alignment_aa" if r["reason"] == "empty_sequence" else detail
        i = int(np.searchsorted(starts, int(at), side="right")) - 1
        rejects.append({**r, "detail": f"{detail}; data row {int(rec_rows[i])}"})
    b = parsed.batch
    kept = np.searchsorted(starts, b.column("offset").to_numpy(), side="right") - 1
    k = len(kept)

    def const_col(key: str) -> pa.Array:
        return pa.repeat(pa.scalar(const[key], pa.string()), k)

    take = pa.array(kept)
    return pa.table(
        {
            "id": b.column("id"),
            "dataset": b.column("dataset"),
            "sequence": b.column("sequence"),
            "length": b.column("length"),
            "name": pa.nulls(k, pa.string()),
            "description": pa.nulls(k, pa.string()),
            "taxon": const_col("species"),
            "taxid": pa.nulls(k, pa.int64()),
            "offset": pa.array(offsets[kept]),
            "unit": const_col("unit"),
            "row": pa.array(rec_rows[kept]),
            "chain": chain.take(take),
            "species": const_col("species"),
            "isotype": isotype.take(take),
            "study": const_col("study"),
            "run": const_col("run"),
        },
        schema=OAS_SCHEMA,
    )


def _bytes(text: pa.StringArray) -> bytes:
    """The strings of `text` back to back (they lie so in its data buffer)."""
    offs = np.frombuffer(text.buffers()[1], np.int32)
    a, b = int(offs[text.offset]), int(offs[text.offset + len(text)])
    return text.buffers()[2].to_pybytes()[a:b]
