"""The DuckDB catalog: views for the contract tables over the Parquet lake.

Readers open a private in-memory DuckDB with the views defined over the lake's files,
so no reader ever holds a lock that could block a writer. `workspace/esm3.duckdb` holds
the same views for any DuckDB client; it is rebuilt by writing a new file and renaming
it over the old one, so a client that has it open never blocks the suite either.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import duckdb

from esm3.metrics.lake import ensure_lake, lake_dir
from esm3.metrics.schema import LATEST_BY, TABLES

CATALOG_FILE = "esm3.duckdb"


class SqlRefused(ValueError):
    """A statement that is not a read-only query."""


# ties in updated_at (coarse clocks, two processes) resolve to the later lifecycle state
_STATE_RANK = (
    "CASE status_or_state WHEN 'SUBMITTED' THEN 0 WHEN 'PENDING' THEN 1 WHEN 'RUNNING' THEN 2 "
    "WHEN 'REQUEUED' THEN 3 ELSE 4 END"
)


def _q(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def view_sql(workspace: str | Path, exclude: frozenset[Path] = frozenset()) -> list[str]:
    """CREATE VIEW statements for every contract table (absolute paths).

    Files in `exclude` (corrupt ones) are left out by listing the table's files explicitly.
    """
    root = lake_dir(Path(workspace).resolve())
    out = []
    for table in TABLES:
        glob = _q(str(root / table / "**" / "*.parquet"))
        src = f"read_parquet({glob}, union_by_name=true)"
        bad = {p for p in exclude if (root / table) in p.parents}
        if bad:
            good = [p for p in sorted((root / table).rglob("*.parquet")) if p not in bad]
            files = ", ".join(_q(str(p)) for p in good)
            src = f"read_parquet([{files}], union_by_name=true)"
        if table in LATEST_BY:
            keys = ", ".join(LATEST_BY[table])
            rank = _STATE_RANK.replace("status_or_state", "status" if table == "runs" else "state")
            raw = f"{table}_history"
            out.append(f"CREATE OR REPLACE VIEW {raw} AS SELECT * FROM {src}")
            out.append(
                f"CREATE OR REPLACE VIEW {table}_latest AS SELECT * FROM {raw} "
                f"QUALIFY row_number() OVER (PARTITION BY {keys} ORDER BY updated_at DESC, {rank} DESC) = 1"
            )
        elif table == "train_steps":
            # a step recomputed after a resume keeps its latest attempt's row
            out.append(f"CREATE OR REPLACE VIEW train_steps_all AS SELECT * FROM {src}")
            out.append(
                "CREATE OR REPLACE VIEW train_steps AS SELECT * FROM train_steps_all "
                "QUALIFY row_number() OVER (PARTITION BY run_id, step "
                "ORDER BY attempt DESC, time DESC) = 1"
            )
        else:
            out.append(f"CREATE OR REPLACE VIEW {table} AS SELECT * FROM {src}")
    # jobs: latest state per (run, job, rank, attempt)
    out.append(
        "CREATE OR REPLACE VIEW jobs AS SELECT * EXCLUDE (updated_at), updated_at FROM jobs_latest"
    )
    # runs: the latest record, with a status derived from its jobs while it is not final
    out.append(
        """CREATE OR REPLACE VIEW runs AS
        WITH j AS (
          SELECT run_id,
                 count(*) FILTER (WHERE state IN ('FAILED','LOST','TIMEOUT')) AS failed,
                 count(*) FILTER (WHERE state = 'CANCELLED') AS cancelled,
                 count(*) FILTER (WHERE state IN ('RUNNING','REQUEUED')) AS running,
                 count(*) FILTER (WHERE state = 'COMPLETED') AS completed,
                 count(*) AS n,
                 min(started_at) AS first_start,
                 max(coalesce(ended_at, updated_at)) AS last_update
          FROM (SELECT * FROM jobs_latest
                QUALIFY row_number() OVER (PARTITION BY run_id, job_id, rank ORDER BY attempt DESC) = 1)
          GROUP BY run_id)
        SELECT r.* REPLACE (
                 CASE WHEN r.status IN ('COMPLETED','FAILED','CANCELLED') OR j.n IS NULL THEN r.status
                      WHEN j.failed > 0 THEN 'FAILED'
                      WHEN j.cancelled > 0 THEN 'CANCELLED'
                      WHEN j.running > 0 THEN 'RUNNING'
                      WHEN j.completed = j.n THEN 'COMPLETED'
                      ELSE r.status END AS status,
                 coalesce(r.started_at, j.first_start) AS started_at,
                 coalesce(r.finished_at, CASE WHEN j.running = 0 AND j.completed + j.failed + j.cancelled = j.n
                                         THEN j.last_update END) AS finished_at)
        FROM runs_latest r LEFT JOIN j USING (run_id)"""
    )
    return out


def find_corrupt_files(workspace: str | Path, *, decode: bool = False) -> dict[Path, str]:
    """Lake files that cannot be read: path -> reason. `decode` also reads every page."""
    import pyarrow.parquet as pq

    bad: dict[Path, str] = {}
    for p in sorted(lake_dir(Path(workspace).resolve()).rglob("*.parquet")):
        try:
            if decode:
                pq.read_table(p)
            else:
                pq.read_metadata(p)
        except Exception as e:  # any failure to read is a corrupt file here
            bad[p] = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
    return bad


def connect(
    workspace: str | Path,
    *,
    sandbox: bool = True,
    exclude: frozenset[Path] = frozenset(),
    on_corrupt=None,  # type: ignore[no-untyped-def]
) -> duckdb.DuckDBPyConnection:
    """An in-memory connection with the contract views; with `sandbox`, only the lake is readable.

    A corrupt file would make every view fail to bind: such files are found and left out.
    """
    ws = Path(workspace).resolve()
    ensure_lake(ws)
    con = duckdb.connect(":memory:")
    con.execute("SET parquet_metadata_cache = true")
    try:
        for stmt in view_sql(ws, exclude):
            con.execute(stmt)
    except duckdb.Error:
        con.close()
        bad = find_corrupt_files(ws)
        if not bad or set(bad) <= exclude:
            raise
        if on_corrupt is not None:
            on_corrupt(bad)
        return connect(ws, sandbox=sandbox, exclude=exclude | frozenset(bad))
    if sandbox:
        con.execute(f"SET allowed_directories=[{_q(str(lake_dir(ws)))}]")
        con.execute("SET enable_external_access=false")
        con.execute("SET lock_configuration=true")
    return con


_ALLOWED = {"SELECT", "EXPLAIN"}


def check_read_only(con: duckdb.DuckDBPyConnection, sql: str) -> None:
    """Raise SqlRefused unless every statement in `sql` is a query."""
    try:
        stmts = con.extract_statements(sql)
    except duckdb.Error as e:
        raise SqlRefused(f"cannot parse SQL: {e}") from e
    if not stmts:
        raise SqlRefused("empty SQL")
    for s in stmts:
        kind = str(s.type).rsplit(".", 1)[-1]
        if kind not in _ALLOWED:
            first = s.query.strip().split(None, 1)[0].upper() if s.query.strip() else kind
            raise SqlRefused(
                f"refused: {first} statements are not allowed; the catalog is read-only "
                "(use SELECT, WITH ... SELECT, DESCRIBE, SHOW, SUMMARIZE or EXPLAIN)"
            )


def _vanished(e: duckdb.Error) -> bool:
    text = str(e)
    return "No such file" in text or "No files found" in text


def query(  # type: ignore[no-untyped-def]
    workspace: str | Path,
    sql: str,
    params: Sequence[object] | Mapping[str, object] | None = None,
    *,
    retries: int = 2,
    on_corrupt=None,
):
    """Run read-only SQL over the catalog; returns a pandas DataFrame.

    Values that come from a user, a file or a record go in `params` (`?` or `$name`
    placeholders), never into the SQL text.

    A lake file can vanish between listing and reading during compaction: retry then.
    Corrupt lake files are left out and reported through `on_corrupt({path: reason})`.
    """
    exclude: frozenset[Path] = frozenset()
    for attempt in range(retries + 1):
        con = connect(workspace, exclude=exclude, on_corrupt=on_corrupt)
        try:
            check_read_only(con, sql)
            return con.execute(sql, params).df()
        except (duckdb.IOException, duckdb.InvalidInputException) as e:
            if attempt == retries:
                raise
            if _vanished(e):  # compaction removed a part: the next listing is whole again
                time.sleep(0.2)
                continue
            # decoding the whole lake is costly: only when a file really failed to read
            bad = find_corrupt_files(workspace, decode=True)
            if bad:
                exclude = frozenset(bad)
                if on_corrupt is not None:
                    on_corrupt(bad)
            elif not isinstance(e, duckdb.IOException):
                raise
            time.sleep(0.2)
        finally:
            con.close()
    raise AssertionError("unreachable")


def refresh_catalog_file(workspace: str | Path) -> Path:
    """(Re)write workspace/esm3.duckdb with the views, by temporary file + rename."""
    ws = Path(workspace).resolve()
    ensure_lake(ws)
    final = ws / CATALOG_FILE
    tmp = ws / f".{CATALOG_FILE}.{os.getpid()}.tmp"
    tmp.unlink(missing_ok=True)
    con = duckdb.connect(str(tmp))
    try:
        for stmt in view_sql(ws):
            con.execute(stmt)
        con.execute("CHECKPOINT")
    finally:
        con.close()
    Path(str(tmp) + ".wal").unlink(missing_ok=True)
    os.replace(tmp, final)
    return final
