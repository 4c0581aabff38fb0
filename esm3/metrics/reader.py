"""The one way the suite opens DuckDB over the lake: `LakeReader`, and limits for user SQL.

Every query (the `esm3` command, records, the dashboard) goes through a `LakeReader`: an
in-memory DuckDB with the catalog's views over the lake's Parquet files, so no reader ever
holds a lock that could block a writer. What each view reads (a glob, or the readable
files of a table with a corrupt one) is a session variable set by a bound parameter, so no
path is ever pasted into SQL. The views are bound once per workspace and process, with
Parquet footers cached (lake files never change in place); each caller gets its own cursor.

One corrupt file must not take everything down: a table with a file that cannot be read is
viewed (in a private database) over an explicit list of its readable files, and the skipped
files are reported in `bad_files` (path relative to the workspace -> reason).

User SQL (the dashboard's SQL box, `esm3 sql`) runs in a database of its own with
`Limits`: memory, threads, spill size in a scratch folder, rows fetched, and a watchdog that
interrupts the query after `timeout_s` (DuckDB has no statement timeout setting). A reader
given `limits` (the dashboard's pages) runs the suite's own queries under the same memory,
threads, spill and timeout (not max_rows: those queries bound their own rows).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import duckdb
import pandas as pd
import pyarrow.parquet as pq

from esm3.metrics.catalog import (
    SqlRefused,
    check_read_only,
    source_var,
    sql_literal,
    view_statements,
)
from esm3.metrics.lake import lake_dir
from esm3.metrics.schema import TABLES

_PARQUET_PATH = re.compile(r"(/[^'\"\n]+?\.parquet)")
# DuckDB errors that can come from an unreadable file (not from the SQL itself)
_NOT_FILE_ERRORS = (
    duckdb.ParserException,
    duckdb.BinderException,
    duckdb.CatalogException,
    duckdb.ConversionException,
    duckdb.PermissionException,
    duckdb.InterruptException,
    duckdb.OutOfMemoryException,
)


class SqlStopped(SqlRefused):
    """A user query stopped by one of its limits (time, memory, spill space)."""


def table_files(root: Path, table: str) -> list[Path]:
    d = root / table
    return sorted(d.rglob("*.parquet")) if d.is_dir() else []


# files found unreadable (or fully read and found fine) in this process, by identity;
# lake files are never rewritten in place, so a verdict holds while (size, mtime) holds
_verdicts: dict[tuple[str, int, int, bool], str | None] = {}
_verdicts_lock = threading.Lock()


def identity(path: Path) -> tuple[str, int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (str(path), st.st_size, st.st_mtime_ns)


def _check_file(path: Path, *, full: bool) -> str | None:
    """None if `path` is a readable Parquet file, else the reason (footer only unless `full`)."""
    ident = identity(path)
    if ident is None:
        return None
    key = (*ident, full)
    with _verdicts_lock:
        if key in _verdicts:
            return _verdicts[key]
    try:
        if full:
            pq.read_table(path)
        else:
            pq.read_metadata(path)
        verdict = None
    except Exception as e:  # noqa: BLE001 - any failure to read means the file is unusable
        verdict = f"{type(e).__name__}: {e}".strip()
    with _verdicts_lock:
        _verdicts[key] = verdict
    return verdict


# one database per workspace with the views bound, shared by the readers of a process
# (each reads through its own cursor); readers that skip a bad file build a private one
_shared: dict[str, duckdb.DuckDBPyConnection] = {}
_shared_lock = threading.Lock()


def clear_shared() -> None:
    """Forget the shared databases and file verdicts of this process."""
    with _shared_lock:
        for con in _shared.values():
            con.close()
        _shared.clear()
    with _verdicts_lock:
        _verdicts.clear()


# -- limits for user SQL --------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    """Bounds on one user query. Sizes are DuckDB sizes ("1GB", "512MiB")."""

    memory: str = "1GB"  # DuckDB memory_limit: beyond it operators spill or fail
    threads: int = 2
    max_rows: int = 10_000  # rows fetched; more are never materialised
    temp: str = "2GB"  # max_temp_directory_size: spill space in the scratch folder
    timeout_s: float = 60.0
    scratch: str | None = None  # parent of the per-query spill folder (default: system temp)

    ENV = {
        "memory": "ESM3_SQL_MEMORY",
        "threads": "ESM3_SQL_THREADS",
        "max_rows": "ESM3_SQL_MAX_ROWS",
        "temp": "ESM3_SQL_TEMP",
        "timeout_s": "ESM3_SQL_TIMEOUT_S",
        "scratch": "ESM3_SQL_SCRATCH",
    }

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **given: object) -> Limits:
        """Defaults, overridden by ESM3_SQL_* variables, overridden by `given` (not None)."""
        env = os.environ if environ is None else environ
        kinds = {"threads": int, "max_rows": int, "timeout_s": float}
        values: dict[str, object] = {}
        for field, var in cls.ENV.items():
            if env.get(var):
                try:
                    values[field] = kinds.get(field, str)(env[var])
                except ValueError as e:
                    raise SqlRefused(f"{var}={env[var]!r} is not a number") from e
        values.update({k: v for k, v in given.items() if v is not None})
        return replace(cls(), **values).checked()

    def env(self) -> dict[str, str]:
        """These limits as ESM3_SQL_* variables (for a server started as a subprocess)."""
        return {var: str(v) for f, var in self.ENV.items() if (v := getattr(self, f)) is not None}

    def duckdb_config(self, spill_dir: str | Path) -> dict[str, object]:
        """The DuckDB settings of these limits, spilling into `spill_dir`."""
        return {
            "memory_limit": self.memory,
            "threads": self.threads,
            "temp_directory": str(spill_dir),
            "max_temp_directory_size": self.temp,
        }

    def checked(self) -> Limits:
        if self.threads < 1 or self.max_rows < 1 or not self.timeout_s > 0:
            raise SqlRefused("SQL limits: threads, max rows and timeout must be positive")
        return self


# -- the reader -----------------------------------------------------------------------------


class LakeReader:
    """Read-only SQL over the catalog views of one workspace, robust to corrupt lake files.

    One reader is meant for one page render or one command: the views see the files
    present when it connects (plus later files, for tables with no bad file). `bad_files`
    maps each skipped file (path relative to the workspace) to the reason it could not be
    read; `bad_paths` has the same by absolute path.
    """

    def __init__(self, workspace: str | Path, limits: Limits | None = None) -> None:
        self.workspace = Path(workspace).resolve()
        # the suite's own queries (the dashboard's pages) under memory, threads, spill and
        # time limits; max_rows is for user SQL only (a page's queries bound their rows)
        self.limits = limits
        self.root = lake_dir(self.workspace)
        self.bad_files: dict[str, str] = {}
        self.bad_paths: dict[Path, str] = {}
        self._listed: set[str] = set()  # tables viewed over an explicit list of files
        self._empty: set[str] = set()  # tables with no readable file: typed, empty views
        self._sources: dict[str, object] = {}
        self._con: duckdb.DuckDBPyConnection | None = None
        self._lock = threading.Lock()

    # -- what the views read ------------------------------------------------------------

    def files(self, table: str) -> list[Path]:
        """The table's readable files (those found unreadable are left out)."""
        return [p for p in table_files(self.root, table) if p not in self.bad_paths]

    def _source(self, table: str) -> object:
        if table in self._listed:
            return [str(p) for p in self.files(table)]
        return str(self.root / table / "**" / "*.parquet")

    def _set_sources(self, con: duckdb.DuckDBPyConnection) -> None:
        for table, value in self._sources.items():
            if table not in self._empty:
                con.execute(f"SET VARIABLE {source_var(table)} = ?", [value])

    def _mark_bad(self, path: Path, reason: str) -> None:
        self._listed.update(t for t in TABLES if (self.root / t) in path.parents)
        try:
            rel = str(path.relative_to(self.workspace))
        except ValueError:
            rel = str(path)
        first = reason.strip().splitlines()[0] if reason.strip() else "unreadable"
        # the path is the key already; keep the reason short
        first = first.replace(f"'{path}'", "").replace(str(path), "").rstrip(" :'\"")
        self.bad_files[rel] = self.bad_paths[path] = first or "unreadable"

    def _locate_bad(self, tables: Iterable[str], err: Exception) -> bool:
        """Find unreadable files behind `err` among `tables`' files; True if any new one."""
        found = False
        for m in _PARQUET_PATH.findall(str(err)):
            p = Path(m)
            if p.is_file() and p not in self.bad_paths and self.root in p.parents:
                self._mark_bad(p, str(err))
                found = True
        if found:
            return True
        # the error names no file: check footers first (cheap), then decode whole files
        for full in (False, True):
            for table in tables:
                for p in table_files(self.root, table):
                    if p not in self.bad_paths:
                        reason = _check_file(p, full=full)
                        if reason:
                            self._mark_bad(p, reason)
                            found = True
            if found:
                return True
        return False

    # -- connections --------------------------------------------------------------------

    def bind_views(self, con: duckdb.DuckDBPyConnection, *, literal: bool = False) -> None:
        """Create the catalog views on `con`, leaving out files that cannot be read.

        With `literal` the views hold the paths themselves (the catalog file, for clients
        that never set the session variables); otherwise they read the variables.
        """
        if not self.root.is_dir():
            raise FileNotFoundError(f"no lake at {self.root}")
        index = 0
        while index < len(statements := view_statements(frozenset(self._empty))):
            table, stmt = statements[index]
            self._sources = {t: self._source(t) for t in TABLES}
            if literal and table is not None and table not in self._empty:
                var = f"getvariable('{source_var(table)}')"
                stmt = stmt.replace(var, sql_literal(self._sources[table]))  # type: ignore[arg-type]
            elif not literal:
                self._set_sources(con)
            try:
                con.execute(stmt)
            except duckdb.Error as e:
                if table is None or table in self._empty:
                    raise
                if "No files found" in str(e) or self._source(table) == []:
                    self._empty.add(table)  # no writer has created the table yet
                    self._listed.add(table)
                    continue
                if isinstance(e, _NOT_FILE_ERRORS) or not self._locate_bad([table], e):
                    raise
                if not self.files(table):
                    self._empty.add(table)
                continue
            index += 1

    def _database(self, config: Mapping[str, object] | None = None) -> duckdb.DuckDBPyConnection:
        """A new in-memory database with the views; only the lake is readable."""
        con = duckdb.connect(":memory:", config=dict(config or {}))
        try:
            con.execute("SET parquet_metadata_cache=true")  # lake files never change in place
            self.bind_views(con)
            con.execute("SET VARIABLE lake_root = ?", [[str(self.root)]])
            con.execute("SET allowed_directories = getvariable('lake_root')")
            con.execute("SET enable_external_access=false")
            con.execute("SET lock_configuration=true")
        except BaseException:
            con.close()
            raise
        return con

    def private_connection(self) -> duckdb.DuckDBPyConnection:
        """A database of the caller's own (closing it is the caller's), variables set."""
        return self._database()

    def _config(self) -> dict[str, object]:
        lim = self.limits
        if lim is None:
            return {}
        spill = Path(lim.scratch or tempfile.gettempdir()) / f"esm3-lake-spill-{os.getpid()}"
        return lim.duckdb_config(spill)

    def connection(self) -> duckdb.DuckDBPyConnection:
        """A cursor on the workspace's shared database (views bound once per process,
        Parquet footers cached), or a private database while some file is unreadable."""
        with self._lock:
            if self._con is None:
                key = (
                    str(self.workspace)
                    if self.limits is None
                    else f"{self.workspace}|{self.limits}"
                )
                with _shared_lock:
                    base = _shared.get(key) if not self._listed else None
                    if base is None:
                        base = self._database(self._config())
                        if not self._listed:
                            _shared[key] = base
                    if _shared.get(key) is base:
                        self._sources = {t: self._source(t) for t in TABLES}
                        base = base.cursor()
                        self._set_sources(base)
                self._con = base
            return self._con

    def cursor(self) -> duckdb.DuckDBPyConnection:
        """A new cursor with the views' variables set (a cursor starts a fresh session)."""
        cur = self.connection().cursor()
        self._set_sources(cur)
        return cur

    def close(self) -> None:
        with self._lock:
            if self._con is not None:
                self._con.close()
                self._con = None

    def __enter__(self) -> LakeReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- queries ------------------------------------------------------------------------

    def sql(
        self,
        sql: str,
        params: Sequence | dict | None = None,
        frames: dict[str, pd.DataFrame] | None = None,
    ) -> pd.DataFrame:
        """Run trusted SQL (the suite's own queries; values in `params`) and return a
        DataFrame; `frames` are registered as views for the query.

        A file that turns out unreadable while the query runs is skipped and the query
        re-run without it; a file removed meanwhile (compaction) is listed again.
        """
        vanished = 0
        while True:
            cur = self.cursor()
            try:
                for name, frame in (frames or {}).items():
                    cur.register(name, frame)
                with self.watched(cur):
                    return cur.execute(sql, params).df()
            except duckdb.Error as e:
                if isinstance(e, _NOT_FILE_ERRORS):
                    raise
                gone = [m for m in _PARQUET_PATH.findall(str(e)) if not Path(m).exists()]
                if (gone or "No files found" in str(e)) and vanished < 3:
                    vanished += 1
                    continue
                if not self._locate_bad(TABLES, e):
                    raise
            finally:
                cur.close()
            self.close()  # rebuild the views without the file just found unreadable

    @contextlib.contextmanager
    def watched(self, cur: duckdb.DuckDBPyConnection) -> Iterator[None]:
        """Interrupt what `cur` runs inside the block after the limits' timeout (if any):
        SqlStopped says so."""
        if self.limits is None:
            yield
            return
        with _stopped_at(
            cur, self.limits.timeout_s, "the time limit; ESM3_SQL_TIMEOUT_S raises it"
        ):
            yield

    def user_sql(self, sql: str, limits: Limits | None = None) -> tuple[pd.DataFrame, bool]:
        """Run a user's read-only SQL under `limits`; returns (rows, truncated).

        Raises SqlRefused for anything but a query and for access outside the lake,
        SqlStopped when a limit stops it; other DuckDB errors propagate.
        """
        limits = limits or Limits.from_env()
        scratch = tempfile.mkdtemp(prefix="esm3-sql-", dir=limits.scratch)
        try:
            try:
                con = self._database(limits.duckdb_config(os.path.join(scratch, "spill")))
            except duckdb.InvalidInputException as e:
                if "memory" in str(e) or "size" in str(e):
                    raise SqlRefused(f"SQL limits: {str(e).splitlines()[0]}") from e
                raise
            try:
                check_read_only(con, sql)
                return _fetch_bounded(con, sql, limits)
            finally:
                con.close()
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


_OUTSIDE = (
    "refused: the catalog reads only the workspace's lake; external access "
    "(URLs, files outside the lake, extensions) is disabled. DuckDB said: "
)


@contextlib.contextmanager
def _stopped_at(con: duckdb.DuckDBPyConnection, timeout_s: float, hint: str) -> Iterator[None]:
    """Interrupt what `con` runs inside the block after `timeout_s` (DuckDB has no statement
    timeout); SqlStopped says so, with `hint` (the limit and how to raise it)."""
    fired = threading.Event()

    def stop() -> None:
        fired.set()
        con.interrupt()

    watchdog = threading.Timer(timeout_s, stop)
    watchdog.daemon = True
    watchdog.start()
    try:
        yield
    except duckdb.InterruptException as e:
        if not fired.is_set():
            raise
        raise SqlStopped(f"query stopped after {timeout_s:g} s ({hint})") from e
    finally:
        watchdog.cancel()


def _fetch_bounded(
    con: duckdb.DuckDBPyConnection, sql: str, limits: Limits
) -> tuple[pd.DataFrame, bool]:
    """Stream at most max_rows + 1 rows; a watchdog interrupts the query at the timeout."""
    hint = "the time limit for user SQL; --timeout or ESM3_SQL_TIMEOUT_S raise it"
    try:
        with _stopped_at(con, limits.timeout_s, hint):
            con.execute(sql)
            if con.description is None:
                return pd.DataFrame(), False
            columns = [d[0] for d in con.description]
            rows = con.fetchmany(limits.max_rows + 1)
    except duckdb.PermissionException as e:
        raise SqlRefused(_OUTSIDE + str(e)) from e
    except duckdb.OutOfMemoryException as e:
        raise SqlStopped(
            f"query stopped: it needs more than its memory limit ({limits.memory}) and "
            f"spill space ({limits.temp}); --memory/--temp or ESM3_SQL_MEMORY/ESM3_SQL_TEMP "
            f"raise them. DuckDB said: {str(e).splitlines()[0]}"
        ) from e
    truncated = len(rows) > limits.max_rows
    return pd.DataFrame.from_records(rows[: limits.max_rows], columns=columns), truncated
