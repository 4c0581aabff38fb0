"""Token statistics: the rows of the paper's Table S3 (`dataset_stats`) and S4 (`token_stats`).

Table S3: per dataset, the clustering level and count (low-level centers), the expansion
level and count (members, i.e. high-level representatives, after the cap), and tokens =
sequences x average length after the cap of 20.

Table S4: drawing k times with replacement from a cluster of n members gives
n (1 - (1 - 1/n)^k) unique members in expectation; summed over clusters this is the number
of unique samples, and weighting each member by its length gives unique tokens. k, the
number of dataset repeats, follows from the dataset's token budget: with the two-level
sampler every center is drawn equally often, so k = budget / (centers x mean sample length),
where the mean sample length is the mean over centers of their mean member length.
"""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pyarrow as pa

from esm3.data.duck import connect
from esm3.data.shards import Source, duckdb_source


def expected_unique(n: np.ndarray, k: float) -> np.ndarray:
    """Expected distinct members after k uniform draws with replacement from clusters of n.

    n: cluster sizes (>= 1), any shape; k: draws per cluster (may be fractional). Computed as
    -n expm1(k log1p(-1/n)) for accuracy at large n. Same shape as n, float64.
    """
    n = np.asarray(n, dtype=np.float64)
    if (n < 1).any():
        raise ValueError("cluster sizes must be >= 1")
    if k < 0:
        raise ValueError(f"repeats k must be >= 0, got {k}")
    if k == 0:
        return np.zeros_like(n)
    with np.errstate(divide="ignore"):  # n == 1: log1p(-1) = -inf, expm1(-inf) = -1
        return -n * np.expm1(k * np.log1p(-1.0 / n))


def cluster_table(expanded: Source, sequences: Source) -> dict[str, np.ndarray]:
    """Per-center member count and summed member length, joining (center, member) rows with
    sequence (id, length) rows in DuckDB (rows without `length` count their `sequence`).
    Returns arrays n (members) and tokens, shape (C,)."""
    con = connect()
    try:
        duckdb_source(con, "expanded", expanded)
        duckdb_source(con, "seqs_in", sequences)
        has_length = "length" in con.table("seqs_in").columns
        con.sql(
            "CREATE VIEW seqs AS SELECT id, length FROM seqs_in"
            if has_length
            else "CREATE VIEW seqs AS SELECT id, length(sequence) AS length FROM seqs_in"
        )
        missing = con.sql(
            "SELECT count(*) FROM expanded e ANTI JOIN seqs s ON e.member = s.id"
        ).fetchall()[0][0]
        if missing:
            raise ValueError(f"{missing} cluster members have no sequence row (id, length)")
        rows = con.sql(
            """SELECT count(*) AS n, sum(s.length)::BIGINT AS tokens
               FROM expanded e JOIN seqs s ON e.member = s.id GROUP BY e.center"""
        ).fetchnumpy()
        return {"n": rows["n"].astype(np.int64), "tokens": rows["tokens"].astype(np.int64)}
    finally:
        con.close()


def repeats_from_budget(token_budget: float, n: np.ndarray, tokens: np.ndarray) -> float:
    """Draws per center (k) that spend `token_budget` tokens under two-level sampling.

    n, tokens: members and summed member length per center, shape (C,).
    """
    n = np.asarray(n, dtype=np.float64)
    mean_sample = float(np.mean(np.asarray(tokens, dtype=np.float64) / n))
    return float(token_budget) / (len(n) * mean_sample)


def dataset_stats_row(
    *,
    dataset: str,
    type: str,
    clustering_level: float | None,
    expansion_level: float | None,
    n: np.ndarray,
    tokens: np.ndarray,
    release: str,
    run_id: str = "",
) -> dict:
    """A `dataset_stats` (Table S3) row from per-center member counts and token sums.

    clustering_count = centers; expansion_count = members after the cap (None when the
    dataset has no expansion level); tokens = sequences x average length.
    """
    sequences = int(np.sum(n))
    total = int(np.sum(tokens))
    avg = total / sequences if sequences else 0.0
    return {
        "run_id": run_id,
        "dataset": dataset,
        "type": type,
        "clustering_level": clustering_level,
        "clustering_count": len(n),
        "expansion_level": expansion_level,
        "expansion_count": sequences if expansion_level is not None else None,
        "sequences": sequences,
        "avg_length": avg,
        "tokens": round(sequences * avg),
        "release": release,
        "computed_at": datetime.now(UTC),
    }


def token_stats_row(
    *,
    dataset: str,
    type: str,
    n: np.ndarray,
    tokens: np.ndarray,
    token_budget: int | None = None,
    repeats: float | None = None,
    run_id: str = "",
) -> dict:
    """A `token_stats` (Table S4) row: expected unique samples and unique tokens.

    Give either `repeats` (k, draws per center) or the dataset's `token_budget` (k derived
    by `repeats_from_budget`). Unique tokens weight each member by its length; members of
    a cluster are equally likely, so a cluster contributes (1 - (1 - 1/n)^k) x its tokens.
    """
    n = np.asarray(n, dtype=np.float64)
    tokens = np.asarray(tokens, dtype=np.float64)
    if (repeats is None) == (token_budget is None):
        raise ValueError("give exactly one of token_budget and repeats")
    k = repeats if repeats is not None else repeats_from_budget(token_budget, n, tokens)
    unique = expected_unique(n, k)
    return {
        "run_id": run_id,
        "dataset": dataset,
        "type": type,
        "token_budget": int(token_budget) if token_budget is not None else None,
        "repeats": float(k),
        "unique_samples": float(unique.sum()),
        "unique_tokens": float((unique / n * tokens).sum()),
        "computed_at": datetime.now(UTC),
    }


def rows_table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    """Rows as an Arrow table of the given contract schema (e.g. TABLES['dataset_stats'])."""
    return pa.Table.from_pylist(rows, schema=schema)
