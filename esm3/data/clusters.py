"""Cluster expansion across two identity levels (paper, A.2.1), in DuckDB.

Input: two clusterings of the same sequences, each as rows (representative, member), e.g.
linclust at 70% (low) and 90% (high). Output: rows (center, member) where a center is a
low-level representative and its members are the high-level representatives inside its
low-level cluster:

1. join the levels on member ids;
2. remove from each low-level cluster the members that belong to a high-level cluster
   without being its representative;
3. drop centers left without members;
4. cap every cluster at `cap` members (20 in the paper), keeping the members with the
   smallest md5 of "<seed>:<member>": deterministic given the seed, independent of row order.

Single-level datasets (JGI at 70%, OAS at 95%) skip steps 1-3: their clusters are only capped.
Everything is SQL over Arrow tables or Parquet files, so it runs out-of-core at the scale of
hundreds of millions of rows; no Python loop touches rows.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from esm3.data.duck import connect
from esm3.data.shards import Source, atomic_path, duckdb_source, is_done, sql_path

EXPANDED_SCHEMA = pa.schema([("center", pa.string()), ("member", pa.string())])
DEFAULT_CAP = 20


def _connect(memory_limit: str | None, threads: int | None, temp_dir: str | None):
    return connect(memory_limit, threads, temp_dir)


def _expand(con, low: Source, high: Source | None, cap: int, seed: int) -> dict:
    """Build temp table `expanded` (center, member, rank) and return the counts."""
    if cap < 1:
        raise ValueError(f"cap must be >= 1, got {cap}")
    duckdb_source(con, "low", low)
    stats: dict = {}
    (stats["low_clusters"], stats["low_members"]) = con.sql(
        "SELECT count(DISTINCT representative), count(*) FROM low"
    ).fetchall()[0]
    if high is not None:
        duckdb_source(con, "high", high)
        (stats["high_clusters"], stats["high_members"]) = con.sql(
            "SELECT count(DISTINCT representative), count(*) FROM high"
        ).fetchall()[0]
        # members of a high-level cluster that are not its representative leave the low level
        con.sql(
            """
            CREATE OR REPLACE TEMP TABLE kept AS
            SELECT l.representative AS center, l.member AS member
            FROM low l ANTI JOIN (
                SELECT member FROM high WHERE member <> representative
            ) h ON l.member = h.member
            """
        )
    else:
        stats["high_clusters"] = stats["high_members"] = None
        con.sql(
            """CREATE OR REPLACE TEMP TABLE kept AS
               SELECT representative AS center, member FROM low"""
        )
    (kept_rows, kept_centers) = con.sql(
        "SELECT count(*), count(DISTINCT center) FROM kept"
    ).fetchall()[0]
    stats["removed_members"] = stats["low_members"] - kept_rows
    stats["dropped_empty_centers"] = stats["low_clusters"] - kept_centers
    bound = {"cap": int(cap), "salt": f"{int(seed)}:"}
    con.execute(
        """
        CREATE OR REPLACE TEMP TABLE expanded AS
        SELECT center, member, rank FROM (
            SELECT center, member, row_number() OVER (
                PARTITION BY center ORDER BY
                    -- the (slow, version-stable) md5 only where a cluster must be cut
                    CASE WHEN size > $cap THEN md5_number_lower($salt || member) ELSE 0 END,
                    member
            ) AS rank
            FROM (SELECT center, member, count(*) OVER (PARTITION BY center) AS size FROM kept)
        ) WHERE rank <= $cap
        """,
        bound,
    )
    (rows, centers, capped) = con.execute(
        """SELECT count(*), count(DISTINCT center),
                  (SELECT count(*) FROM (SELECT center FROM kept GROUP BY center
                                         HAVING count(*) > $cap))
           FROM expanded""",
        {"cap": bound["cap"]},
    ).fetchall()[0]
    stats["members_before_cap"] = kept_rows
    stats["dropped_by_cap"] = kept_rows - rows
    stats["capped_clusters"] = capped
    stats["centers"] = centers
    stats["members"] = rows
    stats["cap"] = cap
    stats["seed"] = seed
    return stats


def expand_clusters(
    low: Source,
    high: Source | None = None,
    *,
    cap: int = DEFAULT_CAP,
    seed: int = 0,
    memory_limit: str | None = None,
    threads: int | None = None,
) -> tuple[pa.Table, dict]:
    """Expand a low-level clustering with a high-level one; return (table, counts).

    `low`, `high`: Arrow tables or Parquet path(s) with columns representative, member
    (`high=None` for single-level datasets). The table has EXPANDED_SCHEMA rows sorted by
    center, then by the seeded order within the center. Counts: low/high clusters and
    members, removed_members, dropped_empty_centers, members_before_cap, dropped_by_cap,
    capped_clusters, centers, members; they add up:
    members = low_members - removed_members - dropped_by_cap,
    centers = low_clusters - dropped_empty_centers.
    """
    con = _connect(memory_limit, threads, None)
    try:
        stats = _expand(con, low, high, cap, seed)
        table = con.sql("SELECT center, member FROM expanded ORDER BY center, rank").arrow()
        if isinstance(table, pa.RecordBatchReader):
            table = table.read_all()
        return table.cast(EXPANDED_SCHEMA), stats
    finally:
        con.close()


def expand_cluster_files(
    low: str | Path | list[str | Path],
    high: str | Path | list[str | Path] | None,
    out: str | Path,
    *,
    cap: int = DEFAULT_CAP,
    seed: int = 0,
    memory_limit: str | None = None,
    threads: int | None = None,
    temp_dir: str | Path | None = None,
) -> tuple[dict, list[dict]]:
    """One task: expand Parquet clusterings into the Parquet file `out` (out-of-core).

    Idempotent: skips when `out` exists (its counts are stored in the file's metadata);
    `out` appears only when complete. Returns (counts, reject rows: none at this stage).
    """
    import json

    import pyarrow.parquet as pq

    out = Path(out)
    if is_done(out):
        meta = pq.ParquetFile(out).metadata.metadata or {}
        return {**json.loads(meta.get(b"expansion", b"{}")), "skipped": True}, []
    con = _connect(memory_limit, threads, str(temp_dir) if temp_dir else None)
    try:
        stats = _expand(con, low, high, cap, seed)
        stats = {"output": str(out), **stats}
        meta = json.dumps(stats).replace("'", "''")
        with atomic_path(out) as tmp:
            # COPY's target and options cannot be bound: the path and the metadata go in as
            # quoted literals (sql_path; `meta` has its quotes doubled above)
            con.execute(
                f"""COPY (SELECT center, member FROM expanded ORDER BY center, rank)
                    TO {sql_path(tmp)}
                    (FORMAT parquet, COMPRESSION zstd, KV_METADATA {{expansion: '{meta}'}})"""  # noqa: S608
            )
        return {**stats, "skipped": False}, []
    finally:
        con.close()
