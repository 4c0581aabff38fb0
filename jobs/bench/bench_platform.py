"""Platform benchmarks: submission overhead (local, slurm-local) and the SQL catalog.

- overhead: wall time from the `esm3` call to the job's first line (its RUNNING record),
  against a bare Python start in the same run.
- catalog: `esm3 sql` over N synthetic `train_steps` rows (10 million by default): a
  per-run aggregate and a last-N-steps query, in-process and through the command.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from jobs.bench import bench_row

SUITE = "platform"


def _bare_python_s() -> float:
    t0 = time.time()
    out = subprocess.run(
        [sys.executable, "-c", "import time; print(time.time())"], capture_output=True, text=True
    )
    return float(out.stdout) - t0


def _overhead(cluster: str, ws: Path) -> float | None:
    from esm3.metrics.catalog import query

    t0 = time.time()
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "jobs.cli",
            "demo",
            "-w",
            str(ws),
            "-c",
            cluster,
            "pipeline=stats",
            "shards=1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if r.returncode != 0:
        return None
    df = query(ws, "SELECT epoch(started_at) AS s FROM jobs ORDER BY started_at DESC LIMIT 1")
    return float(df.s[0]) - t0


def bench_overhead(rows: list[dict[str, Any]], quick: bool) -> None:
    from jobs import slurm_local

    base = min(_bare_python_s() for _ in range(3))
    clusters = ["local"]
    if slurm_local.sinfo_states(slurm_local.LocalCluster(slurm_local.state_dir())):
        clusters.append("slurm-local")
    with tempfile.TemporaryDirectory() as d:
        for cluster in clusters:
            times = [
                t
                for t in (_overhead(cluster, Path(d) / cluster) for _ in range(1 if quick else 3))
                if t
            ]
            if not times:
                continue
            best = min(times)
            rows.append(
                bench_row(
                    SUITE,
                    f"submission overhead ({cluster})",
                    "call to first line",
                    best,
                    "s",
                    baseline=base,
                    params={"repeats": len(times), "baseline": "bare python start", "all": times},
                )
            )


def synthetic_steps(n_rows: int, n_runs: int, seed: int = 0) -> list[pa.Table]:
    """`n_runs` runs of n_rows/n_runs steps each, with plausible per-track losses."""
    rng = np.random.default_rng(seed)
    per = n_rows // n_runs
    out = []
    for r in range(n_runs):
        step = np.arange(per, dtype=np.int64)
        loss = 2.5 * np.exp(-step / (per / 3)) + 0.5 + 0.05 * rng.standard_normal(per)
        out.append(
            pa.table(
                {
                    "run_id": pa.array([f"bench-run-{r:03d}"] * per),
                    "step": step,
                    "attempt": np.zeros(per, np.int32),
                    "loss": loss,
                    "loss_sequence": loss * 0.9,
                    "loss_structure": loss * 1.3,
                    "lr": np.minimum(step / 5000, 1.0) * 4e-4,
                    "grad_norm": np.abs(rng.standard_normal(per)) + 0.2,
                    "clipped": rng.random(per) < 0.05,
                    "skipped": np.zeros(per, bool),
                    "tokens": np.full(per, 1_572_864, np.int64),
                    "tokens_seen": (step + 1) * 1_572_864,
                    "step_time_s": 1.0 + 0.01 * rng.standard_normal(per),
                    "tokens_per_s": 1_572_864.0 + 1000 * rng.standard_normal(per),
                    "time": pa.array(
                        (1.7e15 + step * 1e6).astype("int64"), pa.timestamp("us", tz="UTC")
                    ),
                }
            )
        )
    return out


def bench_catalog(rows: list[dict[str, Any]], quick: bool) -> None:
    from esm3.metrics.catalog import query
    from esm3.metrics.lake import write_table
    from jobs.workspace import prepare

    n = 200_000 if quick else 10_000_000
    n_runs = 20 if quick else 100
    with tempfile.TemporaryDirectory() as d:
        ws = prepare(Path(d) / "ws")
        t0 = time.perf_counter()
        for t in synthetic_steps(n, n_runs):
            write_table(ws, "train_steps", t)
        write_s = time.perf_counter() - t0
        rows.append(
            bench_row(
                SUITE,
                f"lake write {n:,} train_steps",
                "rows/s",
                n / write_s,
                "rows/s",
                params={"rows": n, "runs": n_runs, "seconds": write_s},
            )
        )
        queries = {
            "per-run aggregate": "SELECT run_id, count(*) AS steps, min(loss) AS best, avg(tokens_per_s) AS tps "
            "FROM {t} GROUP BY run_id ORDER BY run_id",
            "last 100 steps of a run": "SELECT step, loss, lr, grad_norm FROM {t} "
            "WHERE run_id = 'bench-run-007' ORDER BY step DESC LIMIT 100",
        }
        for label, sql in queries.items():
            query(ws, sql.format(t="train_steps"))  # warm the file cache
            timings = {}
            for view in ("train_steps", "train_steps_all"):
                best = float("inf")
                for _ in range(3):
                    t0 = time.perf_counter()
                    query(ws, sql.format(t=view))
                    best = min(best, time.perf_counter() - t0)
                timings[view] = best
            rows.append(
                bench_row(
                    SUITE,
                    f"sql {label} ({n:,} rows)",
                    "seconds",
                    timings["train_steps"],
                    "s",
                    baseline=timings["train_steps_all"],
                    params={
                        "rows_per_s": n / timings["train_steps"],
                        "baseline": "the raw view without resume de-duplication",
                    },
                )
            )
            t0 = time.perf_counter()
            r = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "jobs.cli",
                    "sql",
                    "-w",
                    str(ws),
                    "-f",
                    "csv",
                    sql.format(t="train_steps"),
                ],
                capture_output=True,
                text=True,
            )
            cli_s = time.perf_counter() - t0
            if r.returncode == 0:
                rows.append(
                    bench_row(
                        SUITE,
                        f"esm3 sql {label} ({n:,} rows)",
                        "seconds (command)",
                        cli_s,
                        "s",
                        params={"rows_per_s": n / cli_s},
                    )
                )


def run(quick: bool = False) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    bench_overhead(rows, quick)
    bench_catalog(rows, quick)
    return rows
