"""The DuckDB catalog: views for the contract tables over the Parquet lake.

Readers open a private in-memory DuckDB with the views defined over the lake's files,
so no reader ever holds a lock that could block a writer. `workspace/esm3.duckdb` holds
the same views for any DuckDB client; it is rebuilt by writing a new file and renaming
it over the old one, so a client that has it open never blocks the suite either.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import duckdb
import pyarrow as pa

from esm3.metrics.lake import ensure_lake
from esm3.metrics.schema import LATEST_BY, LATEST_PER_OUTPUT, TABLES

CATALOG_FILE = "esm3.duckdb"


class SqlRefused(ValueError):
    """A statement that is not a read-only query."""


# ties in updated_at (coarse clocks, two processes) resolve to the later lifecycle state
_STATE_RANK = (
    "CASE status_or_state WHEN 'SUBMITTED' THEN 0 WHEN 'PENDING' THEN 1 WHEN 'RUNNING' THEN 2 "
    "WHEN 'REQUEUED' THEN 3 ELSE 4 END"
)


def source_var(table: str) -> str:
    """The session variable holding what `table`'s view reads (a glob or a list of files).

    File paths are values, so they reach DuckDB as bound parameters (`SET VARIABLE ... = ?`)
    and the views read them with getvariable(); only schema identifiers are in the SQL text.
    """
    return f"lake_{checked_table(table)}"


def checked_table(name: str) -> str:
    """`name` if it is a contract table (safe to put in SQL text as an identifier)."""
    if name not in TABLES:
        raise KeyError(f"unknown table {name!r}")
    return name


def _duck_type(t: pa.DataType) -> str:  # pyarrow type -> DuckDB type name, for empty views
    if pa.types.is_timestamp(t):
        return "TIMESTAMPTZ" if t.tz else "TIMESTAMP"
    names = {pa.string(): "VARCHAR", pa.int32(): "INTEGER", pa.int64(): "BIGINT"}
    names.update({pa.float64(): "DOUBLE", pa.bool_(): "BOOLEAN"})
    return names.get(t, "VARCHAR")


def _source(table: str, empty: bool) -> str:
    if empty:  # no readable file: a typed, empty relation keeps every query binding
        cols = ", ".join(
            f"CAST(NULL AS {_duck_type(f.type)}) AS {f.name}" for f in TABLES[checked_table(table)]
        )
        return f"(SELECT {cols} WHERE false)"  # noqa: S608 - names and types of the fixed schema
    return f"read_parquet(getvariable('{source_var(table)}'), union_by_name=true)"


def view_statements(empty: frozenset[str] = frozenset()) -> list[tuple[str | None, str]]:
    """(table whose files the statement reads, or None; CREATE VIEW) for every contract view.

    The views read each table's files through `source_var(table)`, which the connection
    sets; tables in `empty` (no readable file) are typed and empty.
    """
    out: list[tuple[str | None, str]] = []
    for table in TABLES:
        src = _source(table, table in empty)
        if table in LATEST_BY:
            keys = ", ".join(LATEST_BY[table])
            rank = _STATE_RANK.replace("status_or_state", "status" if table == "runs" else "state")
            raw = f"{table}_history"
            # by name over the typed empty relation: a column added to the schema later
            # reads as NULL in files written before it
            typed = _source(table, True)
            out.append((table, f"CREATE OR REPLACE VIEW {raw} AS SELECT * FROM {typed} "  # noqa: S608 - schema names
                        f"UNION ALL BY NAME SELECT * FROM {src}"))  # fmt: skip
            out.append(
                (
                    None,
                    f"CREATE OR REPLACE VIEW {table}_latest AS SELECT * FROM {raw} "  # noqa: S608 - schema names
                    f"QUALIFY row_number() OVER (PARTITION BY {keys} ORDER BY updated_at DESC, {rank} DESC) = 1",
                )
            )
        elif table in LATEST_PER_OUTPUT:
            out += _latest_per_output(table, src)
        elif table == "train_steps":
            # a step recomputed after a resume keeps its latest attempt's row
            out.append((table, f"CREATE OR REPLACE VIEW train_steps_all AS SELECT * FROM {src}"))  # noqa: S608 - schema names
            out.append(
                (
                    None,
                    "CREATE OR REPLACE VIEW train_steps AS SELECT * FROM train_steps_all "
                    "QUALIFY row_number() OVER (PARTITION BY run_id, step "
                    "ORDER BY attempt DESC, time DESC) = 1",
                )
            )
        else:
            out.append((table, f"CREATE OR REPLACE VIEW {table} AS SELECT * FROM {src}"))  # noqa: S608 - schema names
    out += [(None, stmt) for stmt in _DERIVED_VIEWS]
    return out


def _latest_per_output(table: str, src: str) -> list[tuple[str | None, str]]:
    """`<table>_all` (every write) and `<table>`: per output key only the newest write (its
    rows share one time stamp), so a re-run replaces rows instead of adding them; rows
    written before keys existed are all kept."""
    stamp, raw = LATEST_PER_OUTPUT[table], f"{table}_all"
    typed = _source(table, True)  # by name: files from before `output_key` read it as NULL
    return [
        (table, f"CREATE OR REPLACE VIEW {raw} AS SELECT * FROM {typed} "  # noqa: S608 - schema names
                f"UNION ALL BY NAME SELECT * FROM {src}"),
        (None, f"CREATE OR REPLACE VIEW {table} AS SELECT * FROM {raw} "  # noqa: S608 - schema names
               f"QUALIFY output_key IS NULL OR {stamp} = max({stamp}) OVER (PARTITION BY output_key)"),
    ]  # fmt: skip


_DERIVED_VIEWS = (
    # jobs: latest state per (run, job, rank, attempt)
    "CREATE OR REPLACE VIEW jobs AS SELECT * EXCLUDE (updated_at), updated_at FROM jobs_latest",
    # runs: the latest record, with a status derived from its jobs while it is not final
    """CREATE OR REPLACE VIEW runs AS
        WITH j AS (
          SELECT run_id,
                 count(*) FILTER (WHERE state IN ('FAILED','LOST','TIMEOUT')) AS failed,
                 count(*) FILTER (WHERE state = 'CANCELLED') AS cancelled,
                 count(*) FILTER (WHERE state IN ('RUNNING','REQUEUED')) AS running,
                 count(*) FILTER (WHERE state = 'COMPLETED') AS completed,
                 count(*) AS n,
                 list(DISTINCT stage) AS stages_seen,
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
                      -- only once every planned stage has run: a driver that stopped
                      -- early leaves completed jobs but not a completed run
                      WHEN j.completed = j.n AND (r.stages IS NULL
                           OR list_has_all(j.stages_seen, string_split(r.stages, ',')))
                           THEN 'COMPLETED'
                      ELSE r.status END AS status,
                 coalesce(r.started_at, j.first_start) AS started_at,
                 coalesce(r.finished_at, CASE WHEN j.running = 0 AND j.completed + j.failed + j.cancelled = j.n
                                              AND (j.completed < j.n OR r.stages IS NULL
                                                   OR list_has_all(j.stages_seen, string_split(r.stages, ',')))
                                         THEN j.last_update END) AS finished_at)
        FROM runs_latest r LEFT JOIN j USING (run_id)""",
    # validation: the trainer's `validation` events, one row per (run, step, dataset, loss
    # column) from detail.per_dataset (esm3.train.validation); a step evaluated again
    # (after a resume or rollback) keeps its latest evaluation; malformed details are skipped
    """CREATE OR REPLACE VIEW validation AS
        SELECT run_id, step, dataset, track, loss, tokens, time FROM (
          SELECT e.run_id, e.step, e.time,
                 x.value->>'dataset' AS dataset,
                 x.value->>'track' AS track,
                 TRY_CAST(x.value->>'loss' AS DOUBLE) AS loss,
                 TRY_CAST(x.value->>'tokens' AS BIGINT) AS tokens
          FROM events e, json_each(e.detail, '$.per_dataset') x
          WHERE e.kind = 'validation' AND json_valid(e.detail) AND json_type(x.value) = 'OBJECT')
        WHERE dataset IS NOT NULL AND track IS NOT NULL
        QUALIFY row_number() OVER (PARTITION BY run_id, step, dataset, track ORDER BY time DESC) = 1""",
)


def connect(workspace: str | Path, *, on_corrupt=None) -> duckdb.DuckDBPyConnection:  # type: ignore[no-untyped-def]
    """A private in-memory connection with the contract views; only the lake is readable.

    Corrupt files are left out (see `esm3.metrics.reader.LakeReader`) and reported through
    `on_corrupt({path: reason})`.
    """
    from esm3.metrics.reader import LakeReader

    r = LakeReader(workspace)
    con = r.private_connection()
    if r.bad_paths and on_corrupt is not None:
        on_corrupt(dict(r.bad_paths))
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


def query(  # type: ignore[no-untyped-def]
    workspace: str | Path,
    sql: str,
    params: Sequence[object] | Mapping[str, object] | None = None,
    *,
    on_corrupt=None,
):
    """Run read-only SQL over the catalog; returns a pandas DataFrame.

    Values that come from a user, a file or a record go in `params` (`?` or `$name`
    placeholders), never into the SQL text. Reads go through the one reader
    (`esm3.metrics.reader.LakeReader`): files that vanish during compaction are listed
    again, corrupt ones are left out and reported through `on_corrupt({path: reason})`.
    """
    from esm3.metrics.reader import LakeReader

    with LakeReader(workspace) as r:
        cur = r.cursor()
        try:
            check_read_only(cur, sql)
        finally:
            cur.close()
        try:
            return r.sql(sql, params)
        finally:
            if r.bad_paths and on_corrupt is not None:
                on_corrupt(dict(r.bad_paths))


def sql_literal(value: str | list[str]) -> str:
    """A DuckDB string (or list) literal. Only for the catalog file's view definitions: DDL
    stored for other clients cannot hold parameters, so the lake's paths are written in,
    quoted here and nowhere else (DuckDB strings have no escapes but a doubled quote)."""
    if isinstance(value, list):
        return "[" + ", ".join(sql_literal(v) for v in value) + "]"
    if "\x00" in value:
        raise ValueError("a path with a NUL byte")
    return "'" + value.replace("'", "''") + "'"


def refresh_catalog_file(workspace: str | Path) -> Path:
    """(Re)write workspace/esm3.duckdb with the views, by temporary file + rename.

    Corrupt lake files are left out as queries leave them out; the temporary file is
    removed on every path, so a failed rebuild leaves nothing behind.
    """
    from esm3.metrics.reader import LakeReader

    ws = Path(workspace).resolve()
    ensure_lake(ws)
    final = ws / CATALOG_FILE
    tmp = ws / f".{CATALOG_FILE}.{os.getpid()}.tmp"
    try:
        tmp.unlink(missing_ok=True)
        con = duckdb.connect(str(tmp))
        try:
            LakeReader(ws).bind_views(con, literal=True)
            con.execute("CHECKPOINT")
        finally:
            con.close()
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
        Path(str(tmp) + ".wal").unlink(missing_ok=True)
    return final
