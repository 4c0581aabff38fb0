"""Parquet shard writing that never leaves a partial file behind.

Every stage writes its output to a temporary name in the destination folder and renames it
into place only when the whole shard is written, so an existing shard is always complete and a
re-run after a crash can skip it (`is_done`).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

COMPRESSION = "zstd"
# dictionary encoding only where values repeat (ids and sequences are unique: trying a
# dictionary on them costs a hash per value and is then abandoned)
DICTIONARY_COLUMNS = ["dataset", "taxon", "name", "level", "reason", "stage", "source"]


def parquet_writer(path: str | Path, schema: pa.Schema) -> pq.ParquetWriter:
    """The suite's Parquet writer settings (zstd, dictionaries only on repetitive columns)."""
    return pq.ParquetWriter(
        path,
        schema,
        compression=COMPRESSION,
        use_dictionary=[c for c in DICTIONARY_COLUMNS if c in schema.names],
    )


def streamed(path: str | Path) -> pq.ParquetFile:
    """A Parquet file to read batch by batch: without pyarrow's pre-buffering (its default),
    which reads a whole row group's column chunks ahead, so memory follows the batch."""
    return pq.ParquetFile(path, pre_buffer=False)


def tmp_path(path: str | Path) -> Path:
    """A unique temporary sibling of `path` (same folder, so the rename is atomic)."""
    p = Path(path)
    return p.with_name(f".{p.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def is_done(path: str | Path) -> bool:
    """True when the shard exists (it can only exist complete)."""
    return Path(path).exists()


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write; rename it to `path` on success, delete it on error."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(final)
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_table(table: pa.Table, path: str | Path, row_group_size: int = 1 << 17) -> Path:
    """Write `table` to `path` as Parquet, atomically."""
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression=COMPRESSION, row_group_size=row_group_size)
    return Path(path)


class ShardWriter:
    """Stream record batches into one Parquet shard; the file appears only on `close()`.

    Use as a context manager: leaving the block with an exception removes the temporary file.
    """

    def __init__(self, path: str | Path, schema: pa.Schema) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.schema = schema
        self.rows = 0
        self._tmp = tmp_path(self.path)
        self._writer: pq.ParquetWriter | None = parquet_writer(self._tmp, schema)

    def write(self, batch: pa.RecordBatch | pa.Table) -> None:
        if self._writer is None:
            raise RuntimeError(f"{self.path}: writer already closed")
        if batch.num_rows:
            # one row group per batch: the writer never buffers more than one batch
            table = pa.Table.from_batches([batch]) if isinstance(batch, pa.RecordBatch) else batch
            self._writer.write_table(table)
            self.rows += batch.num_rows

    def close(self, post: Callable[[Path], tuple[Path, int] | None] | None = None) -> int:
        """Finish the file and rename it into place; returns the rows `post` removed.

        `post(tmp)` may inspect the finished temporary file and return a replacement file and
        the number of rows it dropped (e.g. duplicates), or None to keep it.
        """
        removed = 0
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            result = post(self._tmp) if post is not None else None
            if result is not None:
                replacement, removed = result
                os.replace(replacement, self.path)
                self._tmp.unlink()
            else:
                os.replace(self._tmp, self.path)
        return removed

    def abort(self) -> None:
        """Drop the temporary file; nothing appears at `path`."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._tmp.exists():
            self._tmp.unlink()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


Source = pa.Table | str | Path | list[str | Path]


def duckdb_source(con, name: str, source: Source) -> str:
    """Make `source` (an Arrow table, or Parquet path(s)) queryable as `name` in DuckDB.

    Paths are read lazily by DuckDB (out-of-core); tables are registered zero-copy.
    """
    if isinstance(source, pa.Table):
        con.register(name, source)
        return name
    paths = [source] if isinstance(source, str | Path) else list(source)
    if not paths:
        raise ValueError(f"{name}: no Parquet files given")
    # a relation, not SQL text: the paths are never pasted into a statement; by column name,
    # so shards of datasets with their own columns (OAS units' metadata) read together
    con.read_parquet([str(p) for p in paths], union_by_name=True).create_view(name, replace=True)
    return name


def sql_path(path: str | Path) -> str:
    """A path as a quoted SQL string literal."""
    return "'" + str(path).replace("'", "''") + "'"
