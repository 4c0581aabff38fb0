"""Rows of structure shards (one per chain) and the shard writer.

The columns are the contract with the training loader (`Protein.from_record(row)`):
per-residue arrays are flat lists, NaN where a value is missing; `coords` is L*9 floats,
residue-major, atoms N, CA, C, xyz in Angstrom.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq

STRUCTURE_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("dataset", pa.string()),  # pdb | afdb | esmatlas
        ("source", pa.string()),  # input file
        ("chain", pa.string()),
        ("entity", pa.string()),
        ("accession", pa.string()),  # UniProt (PDB via SIFTS/DBREF, AFDB) or MGnify id
        ("sequence", pa.string()),
        ("coords", pa.list_(pa.float32())),  # L*9
        ("plddt", pa.list_(pa.float32())),  # 0-1, predicted structures only
        ("sasa", pa.list_(pa.float32())),  # square Angstrom
        ("ss8", pa.string()),  # GHITEBSC
        ("structure_tokens", pa.list_(pa.int16())),  # -1 without backbone
        (
            "annotations",
            pa.list_(pa.struct([("ipr", pa.string()), ("start", pa.int32()), ("end", pa.int32())])),
        ),  # 1-based inclusive positions in `sequence`
        ("method", pa.string()),
        ("resolution", pa.float64()),  # Angstrom
        ("deposition_date", pa.string()),  # yyyy-mm-dd
        ("mean_plddt", pa.float64()),
        ("ptm", pa.float64()),
    ]
)


class ShardResult(NamedTuple):
    """What a stage returns for one shard: counts, and rows for the `rejects` table."""

    summary: dict
    rejects: list[dict]


def reject(stage: str, source: str | Path, record: str, reason: str, detail: str) -> dict:
    """One `rejects` row (the writer adds run_id and time)."""
    return {
        "stage": stage,
        "source": str(source),
        "record": record,
        "reason": reason,
        "detail": detail,
    }


def write_shard(
    rows: Iterable[dict], out_path: str | Path, summary: dict, rejects: list[dict]
) -> None:
    """Write rows as one Parquet file under a temporary name, then rename.

    The summary and rejects ride along in the file's metadata, so a re-run that finds the
    file done can report them again (`stored_result`).
    """
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(list(rows), schema=STRUCTURE_SCHEMA)
    table = table.replace_schema_metadata(
        {"esm3.summary": json.dumps(summary), "esm3.rejects": json.dumps(rejects)}
    )
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    pq.write_table(table, tmp, compression="zstd")
    tmp.replace(out_path)


class ShardRowWriter:
    """`write_shard` in batches of rows: memory follows a batch, not the shard (a shard can be
    a whole archive of structures). The file appears at `out_path` on `close`; `abort` (or
    leaving the `with` block on an exception) removes the temporary file."""

    def __init__(self, out_path: str | Path) -> None:
        self.path = Path(out_path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(f".{self.path.name}.tmp")
        self._writer: pq.ParquetWriter | None = pq.ParquetWriter(
            self._tmp, STRUCTURE_SCHEMA, compression="zstd"
        )

    def write(self, rows: Iterable[dict]) -> None:
        table = pa.Table.from_pylist(list(rows), schema=STRUCTURE_SCHEMA)
        if table.num_rows and self._writer is not None:
            self._writer.write_table(table)

    def close(self, summary: dict, rejects: list[dict]) -> None:
        """Finish the file with the summary and rejects in its metadata (`stored_result`)."""
        if self._writer is None:
            return
        self._writer.add_key_value_metadata(
            {"esm3.summary": json.dumps(summary), "esm3.rejects": json.dumps(rejects)}
        )
        self._writer.close()
        self._writer = None
        self._tmp.replace(self.path)

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> ShardRowWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:  # type: ignore[no-untyped-def]
        if exc_type is not None:
            self.abort()


def stored_result(path: str | Path) -> ShardResult:
    """The summary and rejects stored in a finished shard, with summary['skipped'] = True."""
    meta = pq.read_metadata(path).metadata or {}  # file key-value metadata
    summary = json.loads(meta.get(b"esm3.summary", b"{}"))
    summary["skipped"] = True
    return ShardResult(summary, json.loads(meta.get(b"esm3.rejects", b"[]")))


def read_shard(path: str | Path) -> list[dict]:
    """All rows of a shard as dicts (lists for the per-residue columns)."""
    return pq.read_table(path, schema=STRUCTURE_SCHEMA).to_pylist()
