"""The contract tables: names and columns fixed (documented in the README).

The lake is append-only: every table is a set of Parquet files under
`lake/<table>/`; tables whose rows are updated over time (runs, jobs) keep every
version and the catalog's views pick the latest per key.
"""

from __future__ import annotations

import pyarrow as pa

TS = pa.timestamp("us", tz="UTC")

TABLES: dict[str, pa.Schema] = {
    # one row per version of a run record; view `runs` keeps the latest per run_id
    "runs": pa.schema(
        [
            ("run_id", pa.string()),
            ("kind", pa.string()),  # train | preprocess | bench | demo
            ("name", pa.string()),
            ("status", pa.string()),  # SUBMITTED RUNNING COMPLETED FAILED CANCELLED
            ("cluster", pa.string()),
            ("config", pa.string()),  # JSON
            ("git_rev", pa.string()),
            ("image", pa.string()),
            ("slurm_job_id", pa.string()),  # every stage's job id, comma-separated
            ("nodes", pa.int32()),
            ("world_size", pa.int32()),
            ("param_count", pa.int64()),
            ("token_budget", pa.int64()),
            ("submitted_at", TS),
            ("started_at", TS),
            ("finished_at", TS),
            ("updated_at", TS),
            # planned stages, comma-separated: the run is COMPLETED only once each has run
            ("stages", pa.string()),
        ]
    ),
    # one row per lifecycle change of a job / array task / rank / attempt
    "jobs": pa.schema(
        [
            ("run_id", pa.string()),
            ("stage", pa.string()),
            ("job_id", pa.string()),  # scheduler id: "1234", "1234_3" for array tasks
            ("array_index", pa.int32()),
            ("attempt", pa.int32()),  # 0 for the first run, +1 per requeue
            ("rank", pa.int32()),  # global rank; 0 for single-task jobs
            ("node", pa.string()),
            (
                "state",
                pa.string(),
            ),  # SUBMITTED RUNNING COMPLETED FAILED CANCELLED REQUEUED TIMEOUT LOST
            ("exit_code", pa.int32()),
            ("error", pa.string()),
            ("cluster", pa.string()),
            ("submitted_at", TS),
            ("started_at", TS),
            ("ended_at", TS),
            ("updated_at", TS),
        ]
    ),
    "train_steps": pa.schema(
        [
            ("run_id", pa.string()),
            ("step", pa.int64()),
            ("attempt", pa.int32()),
            ("stage", pa.string()),
            ("loss", pa.float64()),
            ("loss_sequence", pa.float64()),
            ("loss_structure", pa.float64()),
            ("loss_ss8", pa.float64()),
            ("loss_sasa", pa.float64()),
            ("loss_function", pa.float64()),
            ("loss_residue", pa.float64()),
            ("lr", pa.float64()),
            ("grad_norm", pa.float64()),
            ("clipped", pa.bool_()),
            ("skipped", pa.bool_()),
            ("update_ratio", pa.float64()),
            ("max_attn_logit", pa.float64()),
            ("tokens", pa.int64()),  # tokens in this step (all ranks)
            ("tokens_seen", pa.int64()),  # cumulative
            ("tokens_by_dataset", pa.string()),  # JSON {dataset: cumulative tokens}
            ("step_time_s", pa.float64()),
            ("data_wait_s", pa.float64()),
            ("tokens_per_s", pa.float64()),
            ("mfu", pa.float64()),
            ("mem_peak_gb", pa.float64()),
            ("time", TS),
            # JSON {name: value} of a model's own per-step values beyond the columns above
            # (the structure tokenizer's losses, codebook usage and perplexity); NULL for ESM3
            ("metrics", pa.string()),
        ]
    ),
    "events": pa.schema(
        [
            ("run_id", pa.string()),
            ("step", pa.int64()),
            (
                "kind",
                pa.string(),
            ),  # spike nonfinite skip rollback checkpoint requeue stage resume ...
            ("severity", pa.string()),  # info warning error
            ("message", pa.string()),
            ("value", pa.float64()),
            ("detail", pa.string()),  # JSON
            ("time", TS),
        ]
    ),
    # Table S3
    "dataset_stats": pa.schema(
        [
            ("run_id", pa.string()),
            ("dataset", pa.string()),
            ("type", pa.string()),  # sequence | structure
            ("clustering_level", pa.float64()),
            ("clustering_count", pa.int64()),
            ("expansion_level", pa.float64()),
            ("expansion_count", pa.int64()),
            ("sequences", pa.int64()),
            ("avg_length", pa.float64()),
            ("tokens", pa.int64()),
            ("release", pa.string()),
            ("computed_at", TS),
            ("output_key", pa.string()),  # the output these rows describe
        ]
    ),
    # Table S4
    "token_stats": pa.schema(
        [
            ("run_id", pa.string()),
            ("dataset", pa.string()),
            ("type", pa.string()),  # sequence | structure | annotation
            ("token_budget", pa.int64()),
            ("repeats", pa.float64()),
            ("unique_samples", pa.float64()),
            ("unique_tokens", pa.float64()),
            ("computed_at", TS),
            ("output_key", pa.string()),  # the output these rows describe
        ]
    ),
    "rejects": pa.schema(
        [
            ("run_id", pa.string()),
            ("stage", pa.string()),
            ("source", pa.string()),  # file
            ("record", pa.string()),  # record id, or line/record number
            ("reason", pa.string()),  # short machine-groupable reason
            ("detail", pa.string()),
            ("time", TS),
            ("output_key", pa.string()),  # the output these rows describe
        ]
    ),
    "benchmarks": pa.schema(
        [
            ("run_id", pa.string()),
            ("suite", pa.string()),
            ("name", pa.string()),
            ("metric", pa.string()),
            ("value", pa.float64()),
            ("unit", pa.string()),
            ("baseline", pa.float64()),  # the baseline's value in the same run, if any
            ("ratio", pa.float64()),  # value / baseline (or as documented per benchmark)
            ("params", pa.string()),  # JSON
            ("host", pa.string()),
            ("time", TS),
        ]
    ),
}

# tables partitioned by run (hive layout lake/<table>/run_id=<id>/...), so a run's
# curves are read without scanning other runs
PARTITIONED = {"train_steps", "events"}

# latest-version views: table -> key columns
LATEST_BY: dict[str, tuple[str, ...]] = {
    "runs": ("run_id",),
    "jobs": ("run_id", "job_id", "rank", "attempt"),
}

# tables whose rows describe one output (a shard, a dataset's clusters): a re-run writes
# them again, and the view shows the newest write per `output_key` (table -> its time
# stamp column, the same for every row of one write); `<table>_all` keeps every write
LATEST_PER_OUTPUT: dict[str, str] = {
    "dataset_stats": "computed_at",
    "token_stats": "computed_at",
    "rejects": "time",
}
