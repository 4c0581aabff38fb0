"""Per-file summaries of `train_steps`, written when a run's files are compacted.

The dashboard's run list, overview and token pages need, per run, the row count, the last
step and the values at it. Computing that reads every `train_steps` row (10M rows: seconds
on a cold start). A summary is one small Parquet file per data file, at the same relative
path under `lake/_summaries/train_steps/`, holding `STEP_SUMMARY` of that file alone and
the data file's size. A summary is a pure function of its data file, which is never
rewritten in place, so it stays right for as long as the data file exists; a reader uses
it only when the data file is there with the size recorded, and summarises every other
file (the newest, not yet compacted ones) from its rows. Combining per-file summaries into
per-run figures is `esm3.metrics.queries.steps_by_run`; nothing else reads them.
"""

from __future__ import annotations

from pathlib import Path

import duckdb
import pyarrow as pa

from esm3.metrics.lake import _atomic_write, lake_dir

SUMMARY_DIR = "_summaries"
SUMMARISED = "train_steps"

# the row that is "last" in a run: highest step, then highest attempt (a recomputed step)
LAST_KEY = "coalesce(step, -1) * 4096 + least(coalesce(attempt, 0), 4095)"
STEP_SUMMARY = f"""
    SELECT filename AS file, run_id, count(*) AS rows, max(step) AS last_step,
           max({LAST_KEY}) AS last_key,
           arg_max(loss, {LAST_KEY}) AS last_loss,
           arg_max(tokens_seen, {LAST_KEY}) AS tokens_seen,
           arg_max(tokens_by_dataset, {LAST_KEY}) AS tokens_by_dataset,
           max(time) AS last_time,
           count(*) FILTER (WHERE skipped) AS skipped_rows,
           count(*) FILTER (WHERE NOT isfinite(loss)) AS nonfinite_rows
    FROM read_parquet($files, filename = true, union_by_name = true) GROUP BY ALL"""  # noqa: S608 - fixed column names
# the same from a file's rows when it has no summary (files since the last compaction): all
# but tokens_by_dataset (a JSON string per row, the costliest column to scan), which
# `queries.tokens_seen` then reads from the one file holding the run's last step
ROW_SUMMARY = STEP_SUMMARY.replace(f"arg_max(tokens_by_dataset, {LAST_KEY})", "NULL::VARCHAR")
COLUMNS = [
    "run_id",
    "rows",
    "last_step",
    "last_key",
    "last_loss",
    "tokens_seen",
    "tokens_by_dataset",
    "last_time",
    "skipped_rows",
    "nonfinite_rows",
]


def summary_path(workspace: str | Path, data_file: Path) -> Path:
    """Where the summary of `data_file` (a `train_steps` file of the lake) lives."""
    root = lake_dir(workspace)
    rel = Path(data_file).resolve().relative_to((root / SUMMARISED).resolve())
    return root / SUMMARY_DIR / SUMMARISED / rel


def write_summary(workspace: str | Path, data_file: Path) -> Path:
    """Summarise one `train_steps` file (in a DuckDB of its own, one thread) and write the
    summary next to the others; returns its path."""
    data_file = Path(data_file)
    size = data_file.stat().st_size
    con = duckdb.connect(":memory:", config={"threads": 1, "memory_limit": "512MB"})
    try:
        got = con.execute(STEP_SUMMARY, {"files": [str(data_file)]}).df()
    finally:
        con.close()
    got = got.drop(columns="file").assign(file_size=size)
    table = pa.Table.from_pandas(got[[*COLUMNS, "file_size"]], preserve_index=False)
    out = summary_path(workspace, data_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(table, out)
    return out


def remove_summary(workspace: str | Path, data_file: Path) -> None:
    try:
        summary_path(workspace, data_file).unlink(missing_ok=True)
    except ValueError:  # not a train_steps file of this lake
        pass


def write_summaries(workspace: str | Path) -> int:
    """Summarise every `train_steps` file that has no summary yet (a lake compacted before
    summaries existed); returns how many were written."""
    root = lake_dir(workspace) / SUMMARISED
    n = 0
    for p in sorted(root.rglob("part-*.parquet")):
        s = summary_path(workspace, p)
        if not s.exists():
            write_summary(workspace, p)
            n += 1
    return n
