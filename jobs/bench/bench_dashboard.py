"""Dashboard benchmark: time to compute each page's queries, and to render each page with
Streamlit's AppTest, on lakes of 1M and 10M `train_steps` rows over many runs (quick: 100k),
as the training job leaves them: each attempt's files compacted when it ends (with their
`train_steps` summaries), the two runs the pages show still writing 10,000-row files after
a rollback ($ESM3_BENCH_DASHBOARD_SHAPE=flushed: every file as a LakeWriter flushed it,
never compacted). `queries_cold`: a fresh process; `queries_live`: the refresh of a live
page after a writer flushed one more file; `render_cold`: the page rendered by Streamlit's
AppTest on a cold cache. The pages' queries run under the dashboard's limits
(`Limits.from_env()`: memory, threads, spill, timeout), and each cold figure has today's
queries against the plain queries before summaries (`queries.plain_queries`) in the same
run: ratio = new / old. $ESM3_BENCH_DASHBOARD_LAKES keeps the lakes between runs.

The loss and stability pages are compared with the naive page that ships every row of the
selected runs to the browser (`SELECT ... FROM train_steps WHERE run_id IN ...`), run side
by side on the same lake: ratio = downsampled time / ship-all time, and the rows and Arrow
bytes each would send.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from esm3.metrics import queries as Q
from esm3.metrics.lake import compact, ensure_lake, table_dir, write_rows
from esm3.metrics.schema import TABLES
from jobs.bench import bench_row

SUITE = "dashboard"
CHUNK = 10_000  # rows per file, as a LakeWriter flushing every 10,000 rows writes them
SELECTED = 2  # runs overlaid on the loss and stability pages (their default)
DATASETS = {"UniRef": 0.3, "MGnify": 0.25, "JGI": 0.2, "AlphaFoldDB": 0.15, "ESMAtlas": 0.1}
T0 = datetime(2024, 3, 1, tzinfo=UTC)


def _steps_table(run_id: str, steps: np.ndarray, attempt: int, rng) -> pa.Table:
    """train_steps rows for one run, built column-wise (the writers' schema, no dict rows)."""
    n = len(steps)
    frac = steps / max(1, steps.max())
    cols: dict[str, object] = {
        "run_id": pa.array([run_id] * n),
        "step": steps,
        "attempt": np.full(n, attempt, np.int32),
        "stage": pa.array(["stage1"] * n),
    }
    base = {"loss_sequence": 2.1, "loss_structure": 3.5, "loss_ss8": 0.7, "loss_sasa": 1.1}
    base |= {"loss_function": 1.3, "loss_residue": 0.4}
    total = np.zeros(n)
    for k, v in base.items():
        cols[k] = v * (1 + np.exp(-5 * frac)) + rng.normal(0, 0.02 * v, n)
        total += cols[k]
    cols["loss"] = total
    cols["lr"] = 4e-4 * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * frac)))
    cols["grad_norm"] = rng.gamma(4.0, 0.2, n)
    cols["clipped"] = cols["grad_norm"] > 1.0
    cols["skipped"] = np.zeros(n, bool)
    cols["update_ratio"] = np.abs(rng.normal(1e-3, 1e-4, n))
    cols["max_attn_logit"] = 12 + 10 * frac + rng.normal(0, 0.5, n)
    cols["tokens"] = np.full(n, 1_572_864, np.int64)
    seen = (steps + 1) * 1_572_864
    cols["tokens_seen"] = seen
    parts = []
    for i, (ds, w) in enumerate(DATASETS.items()):
        parts += [
            ("{" if i == 0 else ", ") + json.dumps(ds) + ": ",
            pc.cast(pa.array((seen * w).astype(np.int64)), pa.string()),
        ]
    parts.append("}")
    cols["tokens_by_dataset"] = pc.binary_join_element_wise(*parts, "")
    for k in ("step_time_s", "data_wait_s", "tokens_per_s", "mfu", "mem_peak_gb"):
        cols[k] = rng.random(n)
    t = pa.array(steps * 1_000_000 + int(T0.timestamp() * 1e6), pa.int64())
    cols["time"] = t.cast(TABLES["train_steps"].field("time").type)
    cols["metrics"] = pa.nulls(n, pa.string())  # ESM3 logs no model-specific values
    schema = TABLES["train_steps"]
    return pa.table({n: cols[n] for n in schema.names}).cast(schema)


def make_lake(
    ws: Path, rows: int, runs: int, seed: int = 0, *, compacted: bool = True
) -> list[str]:
    """A lake with `rows` train_steps rows over `runs` runs (1% recomputed after a rollback),
    their runs/jobs/events records, and Tables S3/S4. Returns the run ids.

    As the training job leaves it (`compacted`): each attempt's files are compacted when it
    ends (one file, with its summary). The first SELECTED runs are live: their second attempt
    recomputes the last 1% of the first attempt's (compacted) steps and is still writing,
    10,000 rows a file, uncompacted. Without `compacted`, every file is as a LakeWriter
    flushed it, never compacted (no summaries).
    """
    ensure_lake(ws)
    rng = np.random.default_rng(seed)
    per = rows // runs
    redo = max(1, per // 100)
    ids = [f"bench-{i:03d}" for i in range(runs)]
    for i, rid in enumerate(ids):
        d = table_dir(ws, "train_steps") / f"run_id={rid}"
        d.mkdir(parents=True, exist_ok=True)
        live = i < SELECTED
        # attempt 0 logs steps [0, a0); attempt 1 recomputes the last `redo` of them after a
        # rollback and logs on to `last`: per rows in all
        last = per - redo
        a0 = last - min(10 * CHUNK, last // 2) if live else last
        attempts = [(0, 0, a0), (1, a0 - redo, last)]
        k = 0
        for attempt, start, stop in attempts:
            for lo in range(start, stop, CHUNK):
                hi = min(lo + CHUNK, stop)
                table = _steps_table(rid, np.arange(lo, hi, dtype=np.int64), attempt, rng)
                pq.write_table(table, d / f"part-bench-{k:05d}.parquet", compression="zstd")
                k += 1
            if compacted and (attempt == 0 or not live):  # the job compacts at attempt end
                compact(ws, "train_steps", run_id=rid, min_files=1)
        base = {"run_id": rid, "kind": "train", "status": "RUNNING", "nodes": 4}
        base |= {"world_size": 32, "token_budget": 2 * per * 1_572_864, "started_at": T0}
        write_rows(ws, "runs", [base | {"config": {"optim": {"grad_clip": 1.0}}}])
        write_rows(
            ws,
            "jobs",
            [
                {"run_id": rid, "stage": "train", "job_id": "7", "rank": r, "attempt": a}
                | {"state": s, "node": f"node{r}"}
                for r in range(4)
                for a, s in ((0, "REQUEUED"), (1, "RUNNING"))
            ],
        )
        ev = [{"run_id": rid, "step": int(s), "kind": "checkpoint"} for s in range(0, per, 1000)]
        ev += [{"run_id": rid, "step": last, "kind": "rollback", "severity": "warning"}]
        ev += [{"run_id": rid, "step": per // 2, "kind": "stage", "message": "stage 2"}]
        ev += [{"run_id": rid, "step": per // 3, "kind": "spike", "severity": "warning"}]
        write_rows(ws, "events", ev)
    write_rows(
        ws,
        "dataset_stats",
        [
            {"run_id": "prep", "dataset": d, "type": "sequence", "sequences": 10**8}
            | {"tokens": 3 * 10**10}
            for d in DATASETS
        ],
    )
    write_rows(
        ws,
        "token_stats",
        [
            {"run_id": "prep", "dataset": d, "type": "sequence", "unique_tokens": 1e10}
            for d in DATASETS
        ],
    )
    write_rows(
        ws,
        "rejects",
        [{"run_id": "prep", "stage": "seq", "source": "x.fasta", "reason": "too_short"}] * 50,
    )
    return ids


def _pages(ids: list[str]) -> dict[str, Callable[[Q.LakeReader], object]]:
    """Each page's queries, as the page issues them on a cold cache."""
    sel = ids[:SELECTED]
    stab = ["grad_norm", "lr", "update_ratio", "max_attn_logit"]

    def overview(r):
        Q.runs_overview(r)
        Q.alerts(r)

    def tokens(r):
        Q.dataset_table(r)
        Q.token_table(r)
        run = Q.run_ids_with_steps(r)[0]
        Q.tokens_seen(r, [run])

    def loss(r):
        Q.run_ids_with_steps(r)
        Q.series(r, sel, list(Q.LOSS_TRACKS), max_points=2000)
        Q.stage_boundaries(r, sel)
        Q.validation_loss(r, sel)

    def stability(r):
        Q.run_ids_with_steps(r)
        Q.series(r, sel, stab, max_points=2000)
        Q.step_events(r, sel)
        Q.clip_threshold(r, sel[0])
        Q.restarts(r, sel)

    def jobs(r):
        Q.job_state_counts(r)
        Q.failures(r)
        Q.job_tasks(r)
        Q.rejects_by_reason(r)

    def sql(r):
        Q.run_user_sql(r, next(iter(Q.EXAMPLE_QUERIES.values())))

    return {
        "overview": overview,
        "tokens": tokens,
        "loss": loss,
        "stability": stability,
        "jobs": jobs,
        "sql": sql,
    }


def _timed(fn: Callable[[], object], repeat: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def _arrow_bytes(df) -> int:
    sink = pa.BufferOutputStream()
    table = pa.Table.from_pandas(df, preserve_index=False)
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue().size


def _apptest(ws: Path, page: str) -> float:
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    app = str(Path(__file__).resolve().parents[2] / "dashboard" / "app.py")
    os.environ["ESM3_WORKSPACE"] = str(ws)
    at = AppTest.from_file(app, default_timeout=300)
    at.session_state["refresh_s"] = 0
    at.run()  # the default page
    st.cache_data.clear()  # then a cold page: every query runs, nothing bound or summarised
    Q.clear_caches()
    path = None if page == "overview" else f"views/{page}.py"
    t = time.perf_counter()
    if path:
        at.switch_page(path)
    at.run()
    dt = time.perf_counter() - t
    if at.exception:
        raise RuntimeError(f"page {page} raised: {at.exception[0].value}")
    return dt


def _measure(ws: Path, ids: list[str], params: dict, quick: bool, repeat: int) -> list[dict]:
    out: list[dict] = []

    def row(name: str, metric: str, value: float, unit: str, baseline=None, **extra) -> None:
        out.append(
            bench_row(SUITE, name, metric, value, unit, baseline=baseline, params=params | extra)
        )

    pages = _pages(ids)
    limits = Q.Limits.from_env()  # as the served dashboard reads: ESM3_SQL_* or defaults

    def cold(fn) -> float:
        Q.clear_caches()  # cold: a fresh process, nothing bound or summarised yet
        t = time.perf_counter()
        with Q.LakeReader(ws, limits=limits) as r:
            fn(r)
        return time.perf_counter() - t

    def plain(fn) -> float:
        with Q.plain_queries():
            return cold(fn)

    lim = {"limits": {k: v for k, v in vars(limits).items() if k != "scratch"}}
    for page, fn in pages.items():
        # today's queries and the queries before summaries, alternately, best of `repeat`
        new_s, old_s = float("inf"), float("inf")
        for i in range(repeat):  # alternating which goes first
            if i % 2:
                new_s = min(new_s, cold(fn))
            old_s = min(old_s, plain(fn))
            if not i % 2:
                new_s = min(new_s, cold(fn))
        row(f"queries_cold/{page}", "page_queries_s", new_s, "s", old_s, **lim)
    # live refresh: a training job's writer just flushed one more file of steps
    sel_run = ids[0]
    d = table_dir(ws, "train_steps") / f"run_id={sel_run}"
    last = max(
        pq.read_metadata(f).row_group(0).column(1).statistics.max for f in d.glob("*.parquet")
    )
    extra = _steps_table(
        sel_run, np.arange(last + 1, last + 1 + CHUNK), 1, np.random.default_rng(1)
    )
    live_file = d / "part-bench-live.parquet"
    pq.write_table(extra, live_file, compression="zstd")
    try:
        for page, fn in pages.items():

            def live(fn=fn) -> None:
                with Q.LakeReader(ws, limits=limits) as r:
                    fn(r)

            row(f"queries_live/{page}", "page_queries_s", _timed(live, repeat)[0], "s", **lim)
    finally:
        live_file.unlink(missing_ok=True)  # a kept lake stays as built
        Q.clear_caches()

    # downsampled curves vs shipping every row of the selected runs, same reader
    sel = ids[:SELECTED]
    everything = (
        f"SELECT run_id, step, {', '.join(Q.LOSS_TRACKS)} FROM train_steps "  # noqa: S608 - schema column names
        "WHERE run_id IN (SELECT unnest($ids)) ORDER BY run_id, step"
    )
    with Q.LakeReader(ws) as r:
        r.connection()
        ds_s, ds = _timed(lambda: Q.series(r, sel, list(Q.LOSS_TRACKS)), repeat)
        all_s, full = _timed(lambda: r.sql(everything, {"ids": sel}), repeat)
    row(
        "loss_curves/downsampled_vs_all_rows",
        "query_s",
        ds_s,
        "s",
        all_s,
        rows_shipped=len(ds),
        rows_all=len(full),
    )
    row("loss_curves/rows_to_browser", "rows", len(ds), "rows", len(full))
    row(
        "loss_curves/arrow_bytes_to_browser",
        "bytes",
        _arrow_bytes(ds),
        "B",
        _arrow_bytes(full),
    )
    for page in ["loss"] if quick else list(_pages(ids)):
        # the page rendered as the served dashboard renders it, and with the plain queries
        Q.clear_caches()
        with Q.plain_queries():
            old_s = _apptest(ws, page)
        Q.clear_caches()
        new_s = _apptest(ws, page)
        row(f"render_cold/{page}", "apptest_render_s", new_s, "s", old_s)
    return out


#: a folder to keep the benchmark's lakes in between runs (building 10M rows takes a minute)
KEEP_ENV = "ESM3_BENCH_DASHBOARD_LAKES"
#: rows:runs[,rows:runs...]: the lakes to measure (default 1000000:20,10000000:50)
SIZES_ENV = "ESM3_BENCH_DASHBOARD_SIZES"
#: "flushed": lakes as LakeWriters leave them, never compacted (default: "compacted")
SHAPE_ENV = "ESM3_BENCH_DASHBOARD_SHAPE"


def _shape() -> str:
    shape = os.environ.get(SHAPE_ENV) or "compacted"
    if shape not in ("compacted", "flushed"):
        raise ValueError(f"{SHAPE_ENV}={shape!r}: 'compacted' or 'flushed'")
    return shape


def _lake_folder(rows: int, runs: int) -> tuple[Path, bool]:
    """Where to build the lake: under $ESM3_BENCH_DASHBOARD_LAKES (kept), else a temp dir."""
    keep = os.environ.get(KEEP_ENV)
    if not keep:
        return Path(tempfile.mkdtemp(prefix="bench-dashboard-")), False
    ws = Path(keep).expanduser().resolve() / f"rows{rows}-runs{runs}-{_shape()}"
    ws.mkdir(parents=True, exist_ok=True)
    return ws, True


def build_lake(ws: Path, rows: int, runs: int) -> list[str]:
    return make_lake(ws, rows, runs, compacted=_shape() == "compacted")


def kept_lake(ws: Path, rows: int, runs: int) -> list[str]:
    """The run ids of a kept lake, building it first if it is not complete."""
    done = ws / "lake-complete.json"
    if done.exists():
        return json.loads(done.read_text())["ids"]
    shutil.rmtree(ws / "lake", ignore_errors=True)
    ids = build_lake(ws, rows, runs)
    done.write_text(json.dumps({"rows": rows, "runs": runs, "ids": ids}))
    return ids


def run(quick: bool = False) -> list[dict]:
    sizes = [(100_000, 5)] if quick else [(1_000_000, 20), (10_000_000, 50)]
    if os.environ.get(SIZES_ENV):  # e.g. "10000000:50"
        sizes = [tuple(int(x) for x in s.split(":")) for s in os.environ[SIZES_ENV].split(",")]
    repeat = 1 if quick else 3
    out: list[dict] = []
    saved_env = os.environ.get("ESM3_WORKSPACE")
    try:
        for rows, runs in sizes:
            ws, kept = _lake_folder(rows, runs)
            try:
                t = time.perf_counter()
                ids = kept_lake(ws, rows, runs) if kept else build_lake(ws, rows, runs)
                params = {"rows": rows, "runs": runs, "selected_runs": SELECTED}
                params |= {"lake": _shape(), "files": len(Q.LakeReader(ws).files("train_steps"))}
                params |= {"max_points": 2000, "host": socket.gethostname()}
                params |= {"lake_write_s": round(time.perf_counter() - t, 2)}
                out += _measure(ws, ids, params, quick, repeat)
            finally:
                if not kept:
                    shutil.rmtree(ws, ignore_errors=True)
    finally:
        if saved_env is None:
            os.environ.pop("ESM3_WORKSPACE", None)
        else:
            os.environ["ESM3_WORKSPACE"] = saved_env
    return out


if __name__ == "__main__":
    import sys

    for r in run(quick="--quick" in sys.argv):
        extra = {k: v for k, v in r["params"].items() if k not in ("host", "limits")}
        ratio = f" ratio {r['ratio']:.3f}" if r["ratio"] is not None else ""
        print(f"{r['name']:40s} {r['value']:12.3f} {r['unit']}{ratio}  {extra}")
