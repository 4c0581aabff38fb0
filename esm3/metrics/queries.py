"""Every query the dashboard and the `esm3` command share, over the lake's catalog views.

Readers never lock: every query goes through `esm3.metrics.reader.LakeReader` (views
over the append-only Parquet files in an in-memory DuckDB, corrupt files skipped and named
in `bad_files`); values always travel as bound parameters. User SQL runs under `Limits`.

Long curves are downsampled in SQL: `series` buckets each run's steps into at most
`max_points` buckets (avg/min/max per bucket), so a page ships a few thousand points per
run whatever the number of `train_steps` rows. Per-run summaries of `train_steps` (rows,
last step, loss, tokens) are combined from per-file summaries: written when a run's files
are compacted (`esm3.metrics.summaries`), computed from the rows for the files since (the
live tail), and kept per file in the process, so a live page re-reads only the files that
landed since its last refresh. `plain_queries()` turns the written summaries off (the
benchmark's baseline; the tests check both give the same answers).
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd

from esm3.metrics import summaries
from esm3.metrics.catalog import SqlRefused
from esm3.metrics.lake import lake_dir
from esm3.metrics.reader import (
    _NOT_FILE_ERRORS,
    LakeReader,
    Limits,
    SqlStopped,
    clear_shared,
    identity,
)
from esm3.metrics.schema import TABLES

__all__ = [
    "EXAMPLE_QUERIES",
    "LOSS_TRACKS",
    "LakeReader",
    "Limits",
    "SqlRefused",
    "SqlStopped",
    "alerts",
    "clear_caches",
    "clip_threshold",
    "dataset_table",
    "expected_unique",
    "expected_unique_curve",
    "failures",
    "job_state_counts",
    "job_tasks",
    "lake_exists",
    "lake_signature",
    "rejects_by_reason",
    "restarts",
    "run_ids_with_steps",
    "run_user_sql",
    "runs_overview",
    "model_metrics",
    "plain_queries",
    "series",
    "stage_boundaries",
    "steps_by_run",
    "step_events",
    "token_table",
    "tokens_seen",
    "validation_loss",
]

# train_steps columns holding a loss, total first
LOSS_TRACKS: tuple[str, ...] = (
    "loss",
    "loss_sequence",
    "loss_structure",
    "loss_ss8",
    "loss_sasa",
    "loss_function",
    "loss_residue",
)
FAILED_STATES = ("FAILED", "TIMEOUT", "LOST")
# events that mark a point on the training curves
STEP_EVENT_KINDS = ("spike", "nonfinite", "skip", "rollback", "requeue", "resume", "restart")
VALIDATION_KINDS = ("validation", "val", "eval")
DEFAULT_CLIP = 1.0  # the paper's gradient clipping threshold (A.2.3)


def _in_list(values: Sequence[str], params: dict, name: str) -> str:
    """`($name0, $name1, ...)` with the values bound in `params`. A literal list keeps the
    filter pushed down to the Parquet scan (hive partitions and the views' windows); an
    `IN (SELECT unnest($list))` subquery makes DuckDB read every run's files."""
    keys = []
    for i, v in enumerate(values):
        params[f"{name}{i}"] = str(v)
        keys.append(f"${name}{i}")
    return "(" + ", ".join(keys) + ")" if keys else "(NULL)"


def lake_exists(workspace: str | Path) -> bool:
    """True when the workspace has a lake folder (a reader never creates one)."""
    return lake_dir(workspace).is_dir()


def lake_signature(workspace: str | Path, tables: Iterable[str] = TABLES) -> tuple:
    """A cheap fingerprint of the lake's files (count, newest mtime, bytes per table).

    It changes whenever a writer adds a file, so callers can cache query results on it.
    """
    root = lake_dir(workspace)
    sig = []
    for table in tables:
        n = size = newest = 0
        for dirpath, _, names in os.walk(root / table):
            for name in names:
                if not name.endswith(".parquet"):
                    continue
                try:
                    st = os.stat(os.path.join(dirpath, name))
                except FileNotFoundError:  # renamed away between listing and stat
                    continue
                n += 1
                size += st.st_size
                newest = max(newest, st.st_mtime_ns)
        sig.append((table, n, newest, size))
    return tuple(sig)


# -- overview -------------------------------------------------------------------------------


# the row that is "last" in a run: highest step, then highest attempt (a recomputed step)
_LAST_KEY = summaries.LAST_KEY
# the plain path's per-file figures: the same query over the rows, without tokens_by_dataset
_PLAIN_COLUMNS = [c for c in summaries.COLUMNS if c != "tokens_by_dataset"]
# per-file summaries of train_steps, by file identity: lake files are never rewritten, so a
# live page re-reads only the files that landed since its last refresh
_summaries: dict[tuple, pd.DataFrame] = {}
_summaries_lock = threading.Lock()
_SUMMARY_CACHE_MAX = 500_000
_fast = True  # False: the queries as they were before the persisted summaries (benchmarks)


@contextlib.contextmanager
def plain_queries() -> Iterator[None]:
    """Within the block, `steps_by_run` and `tokens_seen` read every `train_steps` row (the
    queries before per-file summaries were written at compaction): the benchmark's
    baseline, and the tests' reference for the fast path. Not thread-safe: for one process."""
    global _fast
    before, _fast = _fast, False
    try:
        yield
    finally:
        _fast = before


def clear_caches() -> None:
    """Forget the shared databases, per-file summaries and file verdicts of this process
    (benchmarks use it to time a cold start)."""
    clear_shared()
    with _summaries_lock:
        _summaries.clear()


def _stored_summaries(r: LakeReader, files: list[Path]) -> dict[str, pd.DataFrame]:
    """The summaries written at compaction for `files` (data file -> rows), where one is
    there and was made from a file of the data file's present size."""
    where = {}
    for p in files:
        try:
            s = summaries.summary_path(r.workspace, p)
        except ValueError:
            continue
        if s.is_file():
            where[str(s)] = p
    if not where:
        return {}
    cur = r.cursor()
    try:
        with r.watched(cur):
            got = cur.execute(
                "SELECT * FROM read_parquet($files, filename = true, union_by_name = true)",
                {"files": sorted(where)},
            ).df()
    except duckdb.Error:  # an unreadable summary: summarise those files from their rows
        return {}
    finally:
        cur.close()
    out = {}
    for name, part in got.groupby("filename", sort=False):
        p = where[str(name)]
        ident = identity(p)
        if ident is None or (part["file_size"] != ident[1]).any():
            continue
        out[str(p)] = part[summaries.COLUMNS]
    return out


def steps_by_run(r: LakeReader) -> pd.DataFrame:
    """Per run, from every `train_steps` row: rows, last_step, and at the last step (its
    latest attempt) last_loss, tokens_seen and tokens_by_dataset; last_time, skipped_rows,
    nonfinite_rows. Each file's figures come from its summary written at compaction
    (`esm3.metrics.summaries`) or, for the files since, from its rows; files already
    summarised in this process are not read again."""
    fast = _fast
    columns = summaries.COLUMNS if fast else _PLAIN_COLUMNS
    r.connection()  # binding the views finds the files whose footers are unreadable
    files = r.files("train_steps")
    idents = {str(p): (fast, *ident) for p in files if (ident := identity(p))}
    with _summaries_lock:
        missing = [p for p in files if str(p) in idents and idents[str(p)] not in _summaries]
    if fast and missing:
        stored = _stored_summaries(r, missing)
        with _summaries_lock:
            for p, part in stored.items():
                _summaries[idents[p]] = part.assign(file=p)
        missing = [p for p in missing if str(p) not in stored]
    for i in range(0, len(missing), 2000):
        batch = missing[i : i + 2000]
        while batch:
            cur = r.cursor()
            try:
                with r.watched(cur):
                    got = cur.execute(
                        summaries.ROW_SUMMARY, {"files": [str(p) for p in batch]}
                    ).df()
                break
            except duckdb.Error as e:
                if isinstance(e, _NOT_FILE_ERRORS):
                    raise
                known = any(p in r.bad_paths for p in batch)
                if not known and not r._locate_bad(["train_steps"], e):
                    raise
                batch = [p for p in batch if p not in r.bad_paths]
            finally:
                cur.close()
        else:
            continue
        by_file = dict(tuple(got.groupby("file", sort=False))) if not got.empty else {}
        with _summaries_lock:
            if len(_summaries) > _SUMMARY_CACHE_MAX:
                _summaries.clear()
            for p in batch:
                part = by_file.get(str(p))
                _summaries[idents[str(p)]] = (
                    part[columns] if part is not None else got.iloc[0:0][columns]
                ).assign(file=str(p))
    with _summaries_lock:
        parts = [_summaries[idents[str(p)]] for p in files if idents.get(str(p)) in _summaries]
    parts = [p for p in parts if not p.empty]
    if not parts:
        return pd.DataFrame(columns=[c for c in columns if c != "last_key"])
    allp = pd.concat(parts, ignore_index=True)
    last = allp.loc[allp.groupby("run_id")["last_key"].idxmax()].set_index("run_id")
    agg = allp.groupby("run_id").agg(
        rows=("rows", "sum"),
        last_step=("last_step", "max"),
        last_time=("last_time", "max"),
        skipped_rows=("skipped_rows", "sum"),
        nonfinite_rows=("nonfinite_rows", "sum"),
    )
    for c in ("last_loss", "tokens_seen", "tokens_by_dataset"):
        if c in last:
            agg[c] = last[c]
    out = agg.reset_index()
    if fast:  # the file holding each run's last row (tokens_seen reads it when needed)
        out["last_file"] = out["run_id"].map(last["file"])
    return out


def runs_overview(r: LakeReader) -> pd.DataFrame:
    """One row per run: status, kind, nodes, progress against the token budget, last step,
    last loss and alert counts, newest first.

    Columns: run_id, name, kind, status, cluster, nodes, world_size, param_count,
    token_budget, tokens_seen, progress (fraction of the budget, None without one),
    last_step, last_loss, last_time, rows (train_steps rows), spikes, nonfinite, skipped,
    rollbacks, requeues, failed_jobs, jobs, alerts (one line), submitted_at, started_at,
    finished_at.
    """
    last = steps_by_run(r)
    df = r.sql(
        """
        WITH ev AS (
          SELECT run_id,
                 count(*) FILTER (WHERE kind = 'spike') AS spikes,
                 count(*) FILTER (WHERE kind = 'nonfinite') AS nonfinite_events,
                 count(*) FILTER (WHERE kind = 'skip') AS skip_events,
                 count(*) FILTER (WHERE kind = 'rollback') AS rollbacks,
                 count(*) FILTER (WHERE kind IN ('requeue', 'resume', 'restart')) AS requeues
          FROM events GROUP BY run_id),
        jb AS (
          SELECT run_id, count(*) AS jobs,
                 count(*) FILTER (WHERE state IN ('FAILED', 'TIMEOUT', 'LOST')) AS failed_jobs
          FROM jobs GROUP BY run_id),
        l AS (SELECT * FROM last_by_run),
        ids AS (SELECT run_id FROM runs UNION SELECT run_id FROM l)
        SELECT ids.run_id, r.name, r.kind, r.status, r.cluster, r.nodes, r.world_size,
               r.param_count, r.token_budget, l.tokens_seen,
               CASE WHEN r.token_budget > 0 THEN l.tokens_seen / r.token_budget END AS progress,
               l.last_step, l.last_loss, l.last_time, coalesce(l.rows, 0) AS rows,
               coalesce(ev.spikes, 0) AS spikes,
               greatest(coalesce(ev.nonfinite_events, 0), coalesce(l.nonfinite_rows, 0))
                 AS nonfinite,
               greatest(coalesce(ev.skip_events, 0), coalesce(l.skipped_rows, 0)) AS skipped,
               coalesce(ev.rollbacks, 0) AS rollbacks, coalesce(ev.requeues, 0) AS requeues,
               coalesce(jb.failed_jobs, 0) AS failed_jobs, coalesce(jb.jobs, 0) AS jobs,
               r.submitted_at, r.started_at, r.finished_at
        FROM ids LEFT JOIN runs r USING (run_id) LEFT JOIN l USING (run_id)
             LEFT JOIN ev USING (run_id) LEFT JOIN jb USING (run_id)
        ORDER BY coalesce(r.started_at, r.submitted_at, l.last_time) DESC NULLS LAST, run_id
        """,
        frames={"last_by_run": last},
    )
    df["alerts"] = [_alert_line(row) for row in df.itertuples()]
    return df


def _alert_line(row) -> str:
    parts = []
    for n, word in (
        (row.failed_jobs, "failed job"),
        (row.nonfinite, "non-finite step"),
        (row.spikes, "spike"),
        (row.rollbacks, "rollback"),
        (row.skipped, "skipped step"),
    ):
        if n:
            parts.append(f"{n} {word}{'' if n == 1 else 's'}")
    return ", ".join(parts)


def alerts(r: LakeReader, limit: int = 200) -> pd.DataFrame:
    """Warnings and errors, newest first: events of severity warning/error and failed jobs.

    Columns: time, run_id, source (event kind or 'job'), step, message.
    """
    return r.sql(
        """
        SELECT time, run_id, kind AS source, severity, step, message FROM events
        WHERE severity IN ('warning', 'error') OR kind IN ('spike', 'nonfinite', 'rollback')
        UNION ALL
        SELECT coalesce(ended_at, updated_at), run_id, 'job', 'error', NULL,
               concat_ws(' ', stage, 'job', job_id, 'rank', rank::VARCHAR, 'attempt',
                         attempt::VARCHAR, state, 'on', node, ':', error)
        FROM jobs WHERE state IN ('FAILED', 'TIMEOUT', 'LOST')
        ORDER BY 1 DESC NULLS LAST LIMIT $limit
        """,
        {"limit": int(limit)},
    )


def run_ids_with_steps(r: LakeReader) -> list[str]:
    """Runs that logged train steps, most recently active first."""
    df = steps_by_run(r)
    if df.empty:
        return []
    df = df.sort_values(["last_time", "run_id"], ascending=[False, True], na_position="last")
    return [str(x) for x in df["run_id"]]


# -- token counts ---------------------------------------------------------------------------


def dataset_table(r: LakeReader) -> pd.DataFrame:
    """Table S3: the latest statistics per dataset (columns of `dataset_stats`)."""
    return r.sql(
        """SELECT * EXCLUDE (rn) FROM (
             SELECT *, row_number() OVER (PARTITION BY dataset ORDER BY computed_at DESC) rn
             FROM dataset_stats) WHERE rn = 1
           ORDER BY CASE type WHEN 'sequence' THEN 0 WHEN 'structure' THEN 1 ELSE 2 END,
                    tokens DESC NULLS LAST"""
    )


def token_table(r: LakeReader) -> pd.DataFrame:
    """Table S4: the latest unique samples and tokens per (dataset, type)."""
    return r.sql(
        """SELECT * EXCLUDE (rn) FROM (
             SELECT *, row_number() OVER (PARTITION BY dataset, type ORDER BY computed_at DESC) rn
             FROM token_stats) WHERE rn = 1
           ORDER BY CASE type WHEN 'sequence' THEN 0 WHEN 'structure' THEN 1 ELSE 2 END,
                    unique_tokens DESC NULLS LAST"""
    )


def tokens_seen(r: LakeReader, run_ids: Sequence[str]) -> pd.DataFrame:
    """Cumulative tokens seen per dataset at each run's last logged step.

    Columns: run_id, step, dataset, tokens_seen. From `train_steps.tokens_by_dataset`.
    """
    cols = ["run_id", "step", "dataset", "tokens_seen"]
    if not run_ids:
        return pd.DataFrame(columns=cols)
    if _fast:
        last = steps_by_run(r)
        raw = last[last["run_id"].isin([str(x) for x in run_ids])].rename(
            columns={"last_step": "step", "tokens_by_dataset": "by_dataset"}
        )
        unread = raw[raw["by_dataset"].isna()]
        if not unread.empty:  # last rows in files summarised from their rows: read those
            params: dict = {"files": sorted(set(unread["last_file"]))}
            ids = _in_list(list(unread["run_id"]), params, "id")
            cur = r.cursor()
            try:
                with r.watched(cur):
                    got = cur.execute(
                        f"""SELECT run_id, arg_max(tokens_by_dataset, {_LAST_KEY}) AS by_dataset
                            FROM read_parquet($files, union_by_name = true)
                            WHERE run_id IN {ids} GROUP BY run_id""",  # noqa: S608 - only $placeholders (_in_list) and column names
                        params,
                    ).df()
            except duckdb.Error:  # the file was compacted away meanwhile: read every row
                got = _plain_tokens_seen(r, list(unread["run_id"]))
            finally:
                cur.close()
            found = dict(zip(got["run_id"], got["by_dataset"], strict=True))
            raw = raw.assign(
                by_dataset=[
                    b if isinstance(b, str) else found.get(rid)
                    for rid, b in zip(raw["run_id"], raw["by_dataset"], strict=True)
                ]
            )
    else:
        raw = _plain_tokens_seen(r, run_ids)
    rows = []
    for rec in raw.itertuples():
        try:
            parsed = json.loads(rec.by_dataset) if rec.by_dataset else {}
        except (TypeError, ValueError):
            parsed = {}
        for ds, n in (parsed if isinstance(parsed, dict) else {}).items():
            rows.append((rec.run_id, int(rec.step), str(ds), float(n)))
    return pd.DataFrame(rows, columns=cols)


def _plain_tokens_seen(r: LakeReader, run_ids: Sequence[str]) -> pd.DataFrame:
    params: dict = {}
    ids = _in_list(run_ids, params, "id")
    return r.sql(
        f"""SELECT run_id, max(step) AS step,
                  arg_max(tokens_by_dataset, {_LAST_KEY}) AS by_dataset
           FROM train_steps_all WHERE run_id IN {ids} GROUP BY run_id""",  # noqa: S608 - only $placeholders (_in_list), column names and _LAST_KEY
        params,
    )


def expected_unique(n: float | np.ndarray, k: float | np.ndarray) -> np.ndarray:
    """Expected number of distinct items after `k` draws with replacement from `n` items:
    n (1 - (1 - 1/n)^k) (Table S4's formula), computed stably for large n and k.
    """
    n = np.asarray(n, dtype=float)
    k = np.asarray(k, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = -n * np.expm1(k * np.log1p(-1.0 / n))
    return np.where(n > 0, out, 0.0)


def expected_unique_curve(
    tokens: float, samples: float, seen: float = 0.0, points: int = 200, *, log: bool = False
) -> pd.DataFrame:
    """Expected unique tokens (y) against tokens drawn (x) from a dataset of `tokens` tokens
    in `samples` samples of equal length: tokens/samples * expected_unique(samples, x / len).

    x runs up to max(3 * tokens, 1.2 * seen), from 0 (linear) or, with `log`, from
    min(seen, tokens) / 100 on a geometric grid. Columns: tokens_drawn, unique_tokens.
    """
    hi = max(3.0 * tokens, 1.2 * seen, 1.0)
    if log:
        lo = max(1.0, min(seen or tokens, tokens) / 100.0)
        x = np.geomspace(lo, hi, points)
    else:
        x = np.linspace(0.0, hi, points)
    avg_len = tokens / samples if samples else 0.0
    y = avg_len * expected_unique(samples, x / avg_len) if avg_len else np.zeros_like(x)
    return pd.DataFrame({"tokens_drawn": x, "unique_tokens": y})


# -- curves ---------------------------------------------------------------------------------


def series(
    r: LakeReader,
    run_ids: Sequence[str],
    metrics: Sequence[str],
    *,
    max_points: int = 2000,
    steps: tuple[int | None, int | None] = (None, None),
) -> pd.DataFrame:
    """Per-run curves of `train_steps` columns, bucketed by step in SQL.

    Each run's step range is cut into at most `max_points` buckets of equal width; one row
    per (run_id, bucket): step (first step of the bucket), width (steps per bucket), n
    (rows), for every metric m: m (mean of finite values), m_min, m_max; and nonfinite
    (rows whose loss is NaN/inf), skipped, clipped_frac (fraction of rows clipped).
    Uses the `train_steps` view, so a step recomputed after a resume counts once.
    """
    cols = [m for m in metrics if m in TABLES["train_steps"].names]
    if len(cols) != len(metrics):
        unknown = sorted(set(metrics) - set(cols))
        raise KeyError(f"train_steps has no column(s) {unknown}")
    empty = ["run_id", "step", "width", "n", "nonfinite", "skipped", "clipped_frac"]
    empty += [c for m in cols for c in (m, f"{m}_min", f"{m}_max")]
    if not run_ids:
        return pd.DataFrame(columns=empty)
    lo, hi = steps
    params: dict = {"points": int(max(1, max_points))}
    where = f"run_id IN {_in_list(run_ids, params, 'id')}"
    if lo is not None:
        where += " AND step >= $lo"
        params["lo"] = int(lo)
    if hi is not None:
        where += " AND step <= $hi"
        params["hi"] = int(hi)
    aggs = ",\n".join(
        f"avg({m}) FILTER (WHERE isfinite({m})) AS {m}, "
        f"min({m}) FILTER (WHERE isfinite({m})) AS {m}_min, "
        f"max({m}) FILTER (WHERE isfinite({m})) AS {m}_max"
        for m in cols
    )
    aggs = (aggs + ",") if aggs else ""
    df = r.sql(
        f"""
        WITH s AS (SELECT * FROM train_steps WHERE {where}),
        w AS (SELECT run_id, min(step) AS lo,
                     greatest(1, ceil((max(step) - min(step) + 1) / $points))::BIGINT AS width
              FROM train_steps_all WHERE {where} GROUP BY run_id)
        SELECT s.run_id, w.lo + (s.step - w.lo) // w.width * w.width AS step,
               any_value(w.width) AS width, count(*) AS n, {aggs}
               count(*) FILTER (WHERE NOT isfinite(loss)) AS nonfinite,
               count(*) FILTER (WHERE skipped) AS skipped,
               avg(clipped::DOUBLE) AS clipped_frac
        FROM s JOIN w USING (run_id)
        GROUP BY ALL ORDER BY s.run_id, step
        """,  # noqa: S608 - only $placeholders (_in_list), column names and _LAST_KEY
        params,
    )
    return df


def model_metrics(r: LakeReader, run_ids: Sequence[str], *, max_points: int = 500) -> pd.DataFrame:
    """Per-run curves of a model's own per-step values (`train_steps.metrics`, JSON: the
    structure tokenizer's losses and codebook usage), bucketed by step in SQL as `series`:
    one row per (run_id, metric, bucket) with step, width and value (mean of the finite
    values). Empty for runs without such values (ESM3)."""
    cols = ["run_id", "metric", "step", "width", "value"]
    if not run_ids:
        return pd.DataFrame(columns=cols)
    params: dict = {"points": int(max(1, max_points))}
    where = f"run_id IN {_in_list(run_ids, params, 'id')} AND metrics IS NOT NULL"
    return r.sql(
        f"""
        WITH s AS (SELECT run_id, step, metrics FROM train_steps WHERE {where}),
        w AS (SELECT run_id, min(step) AS lo,
                     greatest(1, ceil((max(step) - min(step) + 1) / $points))::BIGINT AS width
              FROM s GROUP BY run_id),
        kv AS (SELECT s.run_id, s.step, j.key AS metric, TRY_CAST(j.value AS DOUBLE) AS v
               FROM s, json_each(s.metrics) AS j)
        SELECT kv.run_id, metric, w.lo + (kv.step - w.lo) // w.width * w.width AS step,
               any_value(w.width) AS width, avg(v) FILTER (WHERE isfinite(v)) AS value
        FROM kv JOIN w USING (run_id)
        GROUP BY ALL ORDER BY kv.run_id, metric, step
        """,  # noqa: S608 - only $placeholders (_in_list)
        params,
    )


def stage_boundaries(r: LakeReader, run_ids: Sequence[str]) -> pd.DataFrame:
    """Stage changes (events kind='stage'): run_id, step, message."""
    params: dict = {}
    ids = _in_list(run_ids, params, "id")
    return r.sql(
        f"""SELECT run_id, step, coalesce(message, '') AS message FROM events
           WHERE kind = 'stage' AND run_id IN {ids} ORDER BY run_id, step""",  # noqa: S608 - only $placeholders (_in_list), column names and _LAST_KEY
        params,
    )


def step_events(
    r: LakeReader, run_ids: Sequence[str], kinds: Sequence[str] = STEP_EVENT_KINDS
) -> pd.DataFrame:
    """Events to mark on curves: run_id, step, kind, severity, value, message, time."""
    params: dict = {}
    ids, ks = _in_list(run_ids, params, "id"), _in_list(kinds, params, "k")
    return r.sql(
        f"""SELECT run_id, step, kind, severity, value, coalesce(message, '') AS message, time
           FROM events WHERE run_id IN {ids} AND kind IN {ks}
           ORDER BY run_id, step, time""",  # noqa: S608 - only $placeholders (_in_list), column names and _LAST_KEY
        params,
    )


def validation_loss(r: LakeReader, run_ids: Sequence[str]) -> pd.DataFrame:
    """Validation losses logged as events (kind 'validation'/'val'/'eval'), long format.

    `value` is the total loss (track 'loss'); a JSON `detail` object may add per-track
    values under the train_steps column names. Columns: run_id, step, track, value.
    """
    params: dict = {}
    ids, ks = _in_list(run_ids, params, "id"), _in_list(VALIDATION_KINDS, params, "k")
    raw = r.sql(
        f"""SELECT run_id, step, value, detail FROM events
           WHERE kind IN {ks} AND run_id IN {ids} ORDER BY run_id, step""",  # noqa: S608 - only $placeholders (_in_list), column names and _LAST_KEY
        params,
    )
    rows = []
    for rec in raw.itertuples():
        if rec.value is not None and np.isfinite(rec.value):
            rows.append((rec.run_id, rec.step, "loss", float(rec.value)))
        try:
            detail = json.loads(rec.detail) if rec.detail else {}
        except (TypeError, ValueError):
            detail = {}
        if isinstance(detail, dict):
            for k, v in detail.items():
                if k in LOSS_TRACKS and k != "loss" and isinstance(v, int | float):
                    rows.append((rec.run_id, rec.step, k, float(v)))
    return pd.DataFrame(rows, columns=["run_id", "step", "track", "value"])


def clip_threshold(r: LakeReader, run_id: str) -> float:
    """The run's gradient clipping threshold from its config JSON (keys grad_clip,
    clip_grad_norm, max_grad_norm, at any depth), else the paper's 1.0."""
    df = r.sql("SELECT config FROM runs WHERE run_id = $id", {"id": run_id})
    if df.empty or not df["config"].iloc[0]:
        return DEFAULT_CLIP
    try:
        cfg = json.loads(df["config"].iloc[0])
    except (TypeError, ValueError):
        return DEFAULT_CLIP
    stack = [cfg]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for k, v in node.items():
                if k in ("grad_clip", "clip_grad_norm", "max_grad_norm") and isinstance(
                    v, int | float
                ):
                    return float(v)
                stack.append(v)
    return DEFAULT_CLIP


def restarts(r: LakeReader, run_ids: Sequence[str]) -> pd.DataFrame:
    """Requeues and restarts: job attempts after the first, and requeue/resume events.

    Columns: run_id, time, what, step, detail.
    """
    params: dict = {}
    ids = _in_list(run_ids, params, "id")
    return r.sql(
        f"""SELECT run_id, coalesce(started_at, submitted_at, updated_at) AS time,
                  'job ' || job_id || ' rank ' || rank::VARCHAR || ' attempt '
                    || attempt::VARCHAR AS what,
                  NULL::BIGINT AS step, state || coalesce(' on ' || node, '') AS detail
           FROM jobs WHERE run_id IN {ids} AND (attempt > 0 OR state = 'REQUEUED')
           UNION ALL
           SELECT run_id, time, kind, step, coalesce(message, '') FROM events
           WHERE run_id IN {ids} AND kind IN ('requeue', 'resume', 'restart')
           ORDER BY 1, 2 NULLS LAST""",  # noqa: S608 - only $placeholders (_in_list), column names and _LAST_KEY
        params,
    )


# -- jobs -----------------------------------------------------------------------------------


def job_state_counts(r: LakeReader) -> pd.DataFrame:
    """Tasks per (run, stage, state), counting each task's latest attempt.

    Columns: run_id, stage, state, tasks.
    """
    return r.sql(
        """SELECT run_id, coalesce(stage, '') AS stage, state, count(*) AS tasks FROM (
             SELECT * FROM jobs QUALIFY row_number() OVER (
               PARTITION BY run_id, job_id, rank ORDER BY attempt DESC) = 1)
           GROUP BY ALL ORDER BY run_id, stage, state"""
    )


def job_tasks(r: LakeReader, run_id: str | None = None, limit: int = 5000) -> pd.DataFrame:
    """Each task's latest attempt: run_id, stage, job_id, array_index, rank, attempts,
    state, node, exit_code, error, started_at, ended_at, updated_at."""
    return r.sql(
        """SELECT run_id, stage, job_id, array_index, rank, attempt + 1 AS attempts, state,
                   node, exit_code, error, started_at, ended_at, updated_at FROM jobs
            WHERE $id IS NULL OR run_id = $id
            QUALIFY row_number() OVER (PARTITION BY run_id, job_id, rank ORDER BY attempt DESC) = 1
            ORDER BY run_id, stage, array_index NULLS FIRST, rank LIMIT $limit""",
        {"id": run_id or None, "limit": int(limit)},
    )


def failures(r: LakeReader, limit: int = 1000) -> pd.DataFrame:
    """Failed attempts with their error text, newest first: run_id, stage, job_id,
    array_index, rank, attempt, state, node, exit_code, error, ended_at."""
    return r.sql(
        """SELECT run_id, stage, job_id, array_index, rank, attempt, state, node, exit_code,
                   coalesce(error, '') AS error, coalesce(ended_at, updated_at) AS ended_at
            FROM jobs WHERE state IN ('FAILED', 'TIMEOUT', 'LOST')
            ORDER BY ended_at DESC NULLS LAST LIMIT $limit""",
        {"limit": int(limit)},
    )


def rejects_by_reason(r: LakeReader) -> pd.DataFrame:
    """Refused input records per (stage, reason): records, files, one example record."""
    return r.sql(
        """SELECT coalesce(stage, '') AS stage, reason, count(*) AS records,
                  count(DISTINCT source) AS files,
                  arg_min(source || ' : ' || coalesce(record, '?'), time) AS example,
                  arg_min(coalesce(detail, ''), time) AS example_detail
           FROM rejects GROUP BY ALL ORDER BY records DESC, stage, reason"""
    )


# -- user SQL -------------------------------------------------------------------------------

EXAMPLE_QUERIES: dict[str, str] = {
    "Runs, newest first": (
        "SELECT run_id, kind, status, nodes, world_size, token_budget, started_at\n"
        "FROM runs ORDER BY submitted_at DESC NULLS LAST LIMIT 50"
    ),
    "Last step and loss per run": (
        "SELECT run_id, max(step) AS last_step, arg_max(loss, step) AS last_loss,\n"
        "       max(tokens_seen) AS tokens_seen\nFROM train_steps GROUP BY run_id ORDER BY run_id"
    ),
    "Loss per track every 1,000 steps": (
        "SELECT run_id, step // 1000 * 1000 AS step, avg(loss_sequence) AS sequence,\n"
        "       avg(loss_structure) AS structure, avg(loss_function) AS function\n"
        "FROM train_steps GROUP BY ALL ORDER BY run_id, step"
    ),
    "Spikes, non-finite steps and rollbacks": (
        "SELECT run_id, step, kind, severity, value, message FROM events\n"
        "WHERE kind IN ('spike', 'nonfinite', 'skip', 'rollback') ORDER BY time DESC"
    ),
    "Validation loss per dataset": (
        "SELECT run_id, step, dataset, loss, tokens FROM validation\n"
        "WHERE track = 'loss' ORDER BY run_id, step, dataset"
    ),
    "Job states per stage": (
        "SELECT run_id, stage, state, count(*) AS tasks FROM jobs GROUP BY ALL ORDER BY ALL"
    ),
    "Failed jobs with errors": (
        "SELECT run_id, stage, job_id, rank, attempt, node, exit_code, error FROM jobs\n"
        "WHERE state IN ('FAILED', 'TIMEOUT', 'LOST') ORDER BY updated_at DESC"
    ),
    "Table S3: tokens per dataset": (
        "SELECT dataset, type, clustering_level, clustering_count, expansion_level,\n"
        "       expansion_count, tokens / 1e9 AS tokens_billion, release\n"
        "FROM dataset_stats ORDER BY tokens DESC"
    ),
    "Table S4: unique tokens per dataset": (
        "SELECT dataset, type, unique_samples / 1e6 AS samples_million,\n"
        "       unique_tokens / 1e6 AS tokens_million FROM token_stats ORDER BY type, dataset"
    ),
    "Rejected records by reason": (
        "SELECT stage, reason, count(*) AS records FROM rejects GROUP BY ALL ORDER BY records DESC"
    ),
}


def run_user_sql(
    r: LakeReader, sql: str, max_rows: int | None = None, limits: Limits | None = None
) -> tuple[pd.DataFrame, bool]:
    """Run a user's read-only SQL over the catalog under `limits` (default: from the
    environment, see `Limits.from_env`); returns (rows, truncated).

    Raises SqlRefused, with a message saying why, for anything but a query (DROP, INSERT,
    ATTACH, COPY, SET, ...) and for access outside the lake (URLs, other files);
    SqlStopped (a SqlRefused) when the time, memory or spill limit stops it; other DuckDB
    errors propagate as `duckdb.Error` with DuckDB's message.
    """
    limits = limits or Limits.from_env()
    if max_rows is not None:
        limits = replace(limits, max_rows=max_rows).checked()
    return r.user_sql(sql, limits)
