"""Validation sampling and the purge of training sequences that resemble validation ones.

Paper, A.2.1: sample 25,000 proteins per dataset as validation; search training (query)
against validation (target) with `mmseqs easy-search` and the paper's flags; training ids
with a hit at >= 70% identity are blacklisted, with their hits, and removed.

Validation sampling is deterministic and independent of row order and sharding: a dataset's
validation set is the `n` ids with the smallest md5 of "<seed>:<id>".
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from esm3.data.duck import connect
from esm3.data.fasta import write_fasta
from esm3.data.mmseqs import HITS_SCHEMA, search
from esm3.data.shards import Source, duckdb_source, is_done, write_table

DEFAULT_VALIDATION_SIZE = 25_000
MIN_IDENTITY = 0.70  # fraction (mmseqs fident)
BLACKLIST_SCHEMA = pa.schema([("dataset", pa.string()), *HITS_SCHEMA])


def select_validation(
    sequences: Source, n: int = DEFAULT_VALIDATION_SIZE, seed: int = 0
) -> pa.Table:
    """Pick up to `n` validation sequences per dataset from (id, dataset, sequence, ...) rows.

    `sequences`: an Arrow table or Parquet shard path(s). Returns the chosen rows (all
    columns), ordered by dataset and id. The choice is a top-n per dataset over ids only
    (a heap of `n` keys per dataset); the chosen rows are then read back by id, so memory
    follows `n`, not the rows or their sequences.
    """
    con = connect()
    try:
        duckdb_source(con, "seqs", sequences)
        return con.sql(
            """
            WITH chosen AS (
                SELECT dataset, unnest(min_by(id, row(md5_number_lower($salt || id), id), $n))
                       AS id
                FROM seqs GROUP BY dataset
            )
            SELECT s.* FROM seqs s SEMI JOIN chosen c ON s.dataset = c.dataset AND s.id = c.id
            ORDER BY s.dataset, s.id
            """,
            params={"salt": f"{int(seed)}:", "n": int(n)},
        ).to_arrow_table()
    finally:
        con.close()


def write_validation(
    shards: list[str | Path], out: str | Path, n: int = DEFAULT_VALIDATION_SIZE, seed: int = 0
) -> tuple[dict, list[dict]]:
    """One task: choose the validation set from all training shards into Parquet `out`.

    Idempotent. Returns (counts per dataset, reject rows: none).
    """
    out = Path(out)
    skipped = is_done(out)
    if skipped:
        table = pq.read_table(out, columns=["dataset"])
    else:
        table = select_validation([str(s) for s in shards], n, seed)
        write_table(table, out)
        table = table.select(["dataset"])
    return {"validation": str(out), "by_dataset": _counts(table), "skipped": skipped}, []


def blacklist_hits(hits: pa.Table, min_identity: float = MIN_IDENTITY) -> pa.Table:
    """The hits at or above `min_identity` (a fraction), i.e. the evidence per blacklisted id."""
    if not 0.0 <= min_identity <= 1.0:
        raise ValueError(f"min_identity {min_identity} is a fraction in [0, 1], not percent")
    return hits.filter(pc.greater_equal(hits.column("fident"), min_identity))


def purge_shard(
    train: str | Path,
    validation: str | Path,
    out: str | Path,
    blacklist_out: str | Path,
    work_dir: str | Path,
    *,
    min_identity: float = MIN_IDENTITY,
    threads: int = 1,
    split_memory_limit: str | None = None,
) -> tuple[dict, list[dict]]:
    """One task: purge one training shard against the validation set.

    Removes the validation ids from the shard, searches the rest (query) against the
    validation sequences (target), writes the hits at >= `min_identity` to `blacklist_out`
    (dataset + hit columns) and the shard without the blacklisted ids to `out`.
    Idempotent (skips when both outputs exist). Returns (counts per dataset, reject rows:
    one per blacklisted id, reason "validation_hit").
    """
    out, blacklist_out = Path(out), Path(blacklist_out)
    if is_done(out) and is_done(blacklist_out):
        black = pq.read_table(blacklist_out)
        return _summary(pq.read_table(out, columns=["dataset"]), None, black, True), _rejects(
            black, str(train)
        )
    table = pq.read_table(train)
    valid = pq.read_table(validation, columns=["id", "sequence"])
    is_valid = pc.is_in(table.column("id"), value_set=valid.column("id").combine_chunks())
    training = table.filter(pc.invert(is_valid))
    Path(work_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=work_dir, prefix="purge-") as tmp:
        if training.num_rows and valid.num_rows:
            query = write_fasta(training, Path(tmp) / "train.fasta")
            target = write_fasta(valid, Path(tmp) / "valid.fasta")
            hits = search(
                query, target, tmp, threads=threads, split_memory_limit=split_memory_limit
            )
        else:
            hits = HITS_SCHEMA.empty_table()
    black = blacklist_hits(hits, min_identity)
    datasets = pc.take(
        training.column("dataset"),
        pc.index_in(black.column("query"), value_set=training.column("id").combine_chunks()),
    )
    black = pa.table(
        {"dataset": datasets, **{c: black.column(c) for c in HITS_SCHEMA.names}},
        schema=BLACKLIST_SCHEMA,
    ).sort_by([("query", "ascending"), ("fident", "descending"), ("target", "ascending")])
    kept = training.filter(
        pc.invert(pc.is_in(training.column("id"), value_set=black.column("query").unique()))
    )
    write_table(black, blacklist_out)
    write_table(kept, out)
    return _summary(kept, table, black, False), _rejects(black, str(train))


def _counts(table: pa.Table) -> dict[str, int]:
    if table.num_rows == 0:
        return {}
    vc = pc.value_counts(table.column("dataset").combine_chunks()).to_pylist()
    return {c["values"]: c["counts"] for c in vc}


def _summary(kept: pa.Table, before: pa.Table | None, black: pa.Table, skipped: bool) -> dict:
    ids = black.group_by("dataset").aggregate([("query", "count_distinct")]).to_pylist()
    blacklisted = {r["dataset"]: r["query_count_distinct"] for r in ids}
    kept_counts = _counts(kept)
    by_dataset = {
        ds: {"kept": kept_counts.get(ds, 0), "blacklisted": blacklisted.get(ds, 0)}
        for ds in sorted(set(kept_counts) | set(blacklisted))
    }
    if before is not None:
        for ds, n in _counts(before).items():
            row = by_dataset.setdefault(ds, {"kept": 0, "blacklisted": 0})
            row["input"] = n
            row["validation_removed"] = n - row["kept"] - row["blacklisted"]
    return {
        "kept": kept.num_rows,
        "blacklisted": sum(blacklisted.values()),
        "hits": black.num_rows,
        "by_dataset": by_dataset,
        "skipped": skipped,
    }


def _rejects(black: pa.Table, source: str) -> list[dict]:
    """One reject per blacklisted id, naming its best validation hit (rows are sorted)."""
    if black.num_rows == 0:
        return []
    first = pc.not_equal(black.column("query")[1:], black.column("query")[:-1])
    best = black.filter(pa.concat_arrays([pa.array([True]), first.combine_chunks()]))
    agg = black.group_by("query").aggregate([("target", "count")]).to_pylist()
    counts = {r["query"]: r["target_count"] for r in agg}
    return [
        {
            "stage": "purge",
            "source": source,
            "record": r["query"],
            "reason": "validation_hit",
            "detail": f"best hit {r['target']} at identity {r['fident']:.3f} "
            f"({counts[r['query']]} validation hit(s) >= threshold)",
        }
        for r in best.select(["query", "target", "fident"]).to_pylist()
    ]
