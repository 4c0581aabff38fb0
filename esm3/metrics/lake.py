"""Append-only Parquet lake: `workspace/lake/<table>/[run_id=<id>/]part-*.parquet`.

Files are written under a temporary name and renamed, so a reader (or a crash) never
sees a partial file; no file is ever rewritten in place, so writers never wait on readers.
"""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from esm3.metrics.schema import PARTITIONED, TABLES

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def now() -> datetime:
    return datetime.now(UTC)


def lake_dir(workspace: str | Path) -> Path:
    return Path(workspace) / "lake"


def table_dir(workspace: str | Path, table: str) -> Path:
    if table not in TABLES:
        raise KeyError(f"unknown table {table!r}; known: {', '.join(sorted(TABLES))}")
    return lake_dir(workspace) / table


def ensure_lake(workspace: str | Path) -> Path:
    """Create the lake folders and one empty, typed file per table (so every view resolves)."""
    root = lake_dir(workspace)
    for table, schema in TABLES.items():
        d = root / table
        d.mkdir(parents=True, exist_ok=True)
        empty = d / "_empty.parquet"
        if not empty.exists():
            _atomic_write(schema.empty_table(), empty)
    return root


def _atomic_write(table: pa.Table, path: Path) -> None:
    """Write `path` whole or not at all: a failed write (a full disk) leaves no temporary
    file, and the error names the file (pyarrow's does not)."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            pq.write_table(table, f, compression="zstd")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.filename is None and e.errno is not None:
            raise OSError(e.errno, os.strerror(e.errno), str(path)) from e
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _jsonable(v: Any) -> Any:
    if isinstance(v, (dict, list, tuple)):
        return json.dumps(v, sort_keys=True, default=str)
    return v


def to_arrow(table: str, rows: Iterable[Mapping[str, Any]]) -> pa.Table:
    """Rows (dicts) -> an Arrow table with the contract schema; unknown keys are an error."""
    table_dir(".", table)  # validates the name
    schema = TABLES[table]
    names = set(schema.names)
    stamp = now()
    cols: dict[str, list[Any]] = {n: [] for n in schema.names}
    for row in rows:
        extra = set(row) - names
        if extra:
            raise KeyError(f"table {table!r} has no column(s) {sorted(extra)}")
        for n in schema.names:
            v = row.get(n)
            if v is None and n in ("time", "updated_at", "computed_at"):
                v = stamp
            cols[n].append(_jsonable(v))
    return pa.table({n: pa.array(cols[n], type=schema.field(n).type) for n in schema.names})


def write_rows(workspace: str | Path, table: str, rows: Iterable[Mapping[str, Any]]) -> Path | None:
    """Write rows as one new Parquet file; returns its path (None when there were no rows)."""
    paths = _write_rows(workspace, table, rows)
    return paths[-1] if paths else None


def _write_rows(workspace: str | Path, table: str, rows: Iterable[Mapping[str, Any]]) -> list[Path]:
    """`write_rows`, returning every file written (one per run for partitioned tables)."""
    data = to_arrow(table, rows)
    if data.num_rows == 0:
        return []
    d = table_dir(workspace, table)
    if table in PARTITIONED:
        run_ids = set(data.column("run_id").to_pylist())
        if len(run_ids) != 1:
            # one file per run keeps each run's folder self-contained
            return [
                _write_part(
                    d / f"run_id={_SAFE.sub('_', str(rid))}",
                    data.filter(pc.equal(data.column("run_id"), rid)),
                )
                for rid in sorted(run_ids, key=str)
            ]
        d = d / f"run_id={_SAFE.sub('_', str(next(iter(run_ids))))}"
    return [_write_part(d, data)]


def _write_part(d: Path, data: pa.Table) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    host = _SAFE.sub("_", socket.gethostname())
    path = d / f"part-{stamp}-{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}.parquet"
    _atomic_write(data, path)
    return path


class LakeWriter:
    """Buffers rows of one table and writes them every `flush_rows` rows or `flush_seconds`.

    `add` never blocks on readers. Use as a context manager, or call `close()`, so the
    last rows are written; a background timer flushes a quiet buffer so dashboards stay live.
    When `flush()` returns, every row added before the call is in a lake file, including
    rows the background timer had taken and was still writing.
    """

    def __init__(
        self,
        workspace: str | Path,
        table: str,
        *,
        flush_rows: int = 10_000,
        flush_seconds: float = 5.0,
        background: bool = True,
        compact_every: int = 0,
    ) -> None:
        table_dir(workspace, table)  # validates the name
        self.workspace = Path(workspace)
        self.table = table
        self.flush_rows = flush_rows
        self.flush_seconds = flush_seconds
        # merge this writer's own files every `compact_every` files per folder (0: never),
        # so a live run's folder holds a few merged files (with summaries) and a short tail
        self.compact_every = compact_every
        self._written: dict[Path, list[Path]] = {}
        self._rows: list[Mapping[str, Any]] = []
        self._lock = threading.Lock()  # guards the buffer; held only briefly
        self._write_lock = threading.Lock()  # one flush at a time, so flushes finish in order
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if background and flush_seconds > 0:
            self._thread = threading.Thread(target=self._tick, daemon=True, name=f"lake-{table}")
            self._thread.start()

    def add(self, row: Mapping[str, Any]) -> None:
        with self._lock:
            self._rows.append(row)
            due = len(self._rows) >= self.flush_rows
        if due:
            self.flush()

    def extend(self, rows: Iterable[Mapping[str, Any]]) -> None:
        for r in rows:
            self.add(r)

    def flush(self) -> Path | None:
        with self._write_lock:
            with self._lock:
                rows, self._rows = self._rows, []
                self._last = time.monotonic()
            paths = _write_rows(self.workspace, self.table, rows) if rows else []
            if self.compact_every > 1:
                for p in paths:
                    mine = self._written.setdefault(p.parent, [])
                    mine.append(p)
                    if len(mine) >= self.compact_every:
                        try:
                            compact_files(self.workspace, self.table, mine)
                        except OSError:  # a full disk: the parts stay, as readable
                            pass
                        self._written[p.parent] = []
            return paths[-1] if paths else None

    def _tick(self) -> None:
        while not self._stop.wait(min(1.0, self.flush_seconds)):
            if self._rows and time.monotonic() - self._last >= self.flush_seconds:
                self.flush()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.flush()

    def __enter__(self) -> LakeWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_table(workspace: str | Path, table: str, data: pa.Table) -> Path | None:
    """Write an Arrow table (columns a subset of the contract's) as new lake file(s).

    For bulk writers (benchmarks, compaction): no per-row Python work.
    """
    schema = TABLES[table_dir(workspace, table).name]
    extra = set(data.column_names) - set(schema.names)
    if extra:
        raise KeyError(f"table {table!r} has no column(s) {sorted(extra)}")
    cols = [
        data.column(f.name).cast(f.type)
        if f.name in data.column_names
        else pa.nulls(data.num_rows, f.type)
        for f in schema
    ]
    full = pa.Table.from_arrays(cols, schema=schema)
    if full.num_rows == 0:
        return None
    d = table_dir(workspace, table)
    if table not in PARTITIONED:
        return _write_part(d, full)
    last = None
    for rid in pc.unique(full.column("run_id")).to_pylist():
        part = full.filter(pc.equal(full.column("run_id"), rid))
        last = _write_part(d / f"run_id={_SAFE.sub('_', str(rid))}", part)
    return last


def compact(
    workspace: str | Path, table: str, *, run_id: str | None = None, min_files: int = 8
) -> int:
    """Merge each folder's small part files into one (a long run writes one every few seconds).

    The merged file is renamed into place before the parts are removed, so a reader sees
    every row throughout (at worst twice, for an instant; the views de-duplicate steps and
    record versions). Unreadable parts are left alone. Returns the number of parts merged.
    `train_steps` files get a summary (`esm3.metrics.summaries`) as they are merged.
    """
    root = table_dir(workspace, table)
    if run_id is not None:
        root = root / f"run_id={_SAFE.sub('_', run_id)}"
    merged = 0
    for d in sorted({p.parent for p in root.rglob("part-*.parquet")}):
        parts = sorted(d.glob("part-*.parquet"))
        if len(parts) >= min_files:
            merged += compact_files(workspace, table, parts)
    return merged


def compact_files(workspace: str | Path, table: str, parts: Sequence[Path]) -> int:
    """Merge `parts` (files of one folder of `table`) into one file, as `compact` does;
    returns the number merged (0 with fewer than two readable ones)."""
    from esm3.metrics import summaries  # it imports this module

    tables, used = [], []
    for p in parts:
        try:
            tables.append(pq.read_table(p))
            used.append(p)
        except Exception:  # corrupt: keep it for a person to look at
            continue
    if len(used) < 2:
        return 0
    if len({p.parent for p in used}) != 1:
        raise ValueError("compact_files merges the files of one folder")
    data = pa.concat_tables(tables, promote_options="default")
    out = _write_part(
        used[0].parent,
        data.cast(TABLES[table]) if data.schema.names == TABLES[table].names else data,
    )
    if table == summaries.SUMMARISED:
        try:  # without it readers summarise the file from its rows: slower, as right
            summaries.write_summary(workspace, out)
        except Exception:  # noqa: BLE001, S110 - a summary is an optimisation only
            pass
    for p in used:
        p.unlink(missing_ok=True)
        if table == summaries.SUMMARISED:
            summaries.remove_summary(workspace, p)
    return len(used)
