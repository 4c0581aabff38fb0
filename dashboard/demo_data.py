"""A simulated workspace for the dashboard's tests, benchmark and screenshots.

Everything is written with the lake's own writers (`write_rows`, `LakeWriter`), exactly as
the preprocessing and training jobs write it: runs and their jobs (with a failure and a
requeue), per-step training metrics with plausible per-track losses, a loss spike, a
non-finite step that is skipped, a rollback that recomputes steps in a new attempt, a
stage change, validation losses, checkpoints, the paper's Tables S3 and S4, and rejects.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np

from esm3.metrics.lake import LakeWriter, ensure_lake, write_rows

T0 = datetime(2024, 3, 1, 8, 0, tzinfo=UTC)
BATCH_TOKENS = 1_572_864  # the paper's batch (Table S1)

# Table S3 of the paper: dataset, type, clustering level (count), expansion level (count),
# tokens, release
TABLE_S3 = [
    ("UniRef", "sequence", 0.70, 83e6, 0.90, 156e6, 54.6e9, "2023_02"),
    ("MGnify", "sequence", 0.70, 372e6, 0.90, 621e6, 105.5e9, "2023_02"),
    ("JGI", "sequence", 0.70, 2029e6, None, None, 256e9, "non-restricted, 2023-07-30"),
    ("OAS", "sequence", 0.95, 1192e6, None, None, 132e9, "2023-07-30"),
    ("PDB", "structure", None, 203e3, None, None, 0.054e9, "before 2020-05-01"),
    ("PDB Clustered", "structure", 0.70, 46e3, 1.00, 100e3, 0.027e9, "before 2020-05-01"),
    ("AlphaFoldDB", "structure", 0.70, 36e6, 0.90, 69e6, 40.5e9, "v4"),
    ("ESMAtlas", "structure", 0.70, 87e6, 0.90, 179e6, 23.5e9, "v0, v2023_02"),
]
# Table S4: dataset, type, unique samples (M), unique tokens (M); the inverse-folded sets
# hold generated sequences, and the paper gives annotations as one total
TABLE_S4 = [
    ("UniRef", "sequence", 133, 40_177),
    ("MGnify", "sequence", 406, 65_780),
    ("JGI", "sequence", 2_039, 265_070),
    ("OAS", "sequence", 203, 22_363),
    ("PDB", "structure", 0.2, 55),
    ("AlphaFoldDB", "structure", 68, 20_510),
    ("ESMAtlas", "structure", 168, 38_674),
    ("AlphaFoldDB inverse folded", "sequence", 111, 33_300),
    ("ESMAtlas inverse folded", "sequence", 251, 57_730),
    ("Function annotations", "annotation", 539, 105_957),
]
# share of each batch drawn from each dataset (a plausible mix, not the paper's)
MIX = {
    "UniRef": 0.25,
    "MGnify": 0.20,
    "JGI": 0.15,
    "OAS": 0.05,
    "PDB": 0.05,
    "AlphaFoldDB": 0.15,
    "ESMAtlas": 0.15,
}
# (start, end) of each track's loss over a run, in nats per token
TRACK_LOSS = {
    "loss_sequence": (2.70, 2.05),
    "loss_structure": (6.20, 3.40),
    "loss_ss8": (1.60, 0.70),
    "loss_sasa": (2.10, 1.10),
    "loss_function": (3.20, 1.30),
    "loss_residue": (1.10, 0.35),
}


@dataclass
class SimRun:
    """What was written for one simulated training run (for assertions)."""

    run_id: str
    steps: int
    token_budget: int
    last_step: int = 0
    last_loss: float = float("nan")
    tokens_seen: int = 0
    tokens_by_dataset: dict[str, int] = field(default_factory=dict)
    spike_step: int = 0
    nonfinite_step: int = 0
    rollback: tuple[int, int] = (0, 0)  # (from step, back to step)
    stage_step: int = 0
    rows_written: int = 0


def lr_at(step: int, peak: float = 4e-4, warmup: int = 200, total: int = 2000) -> float:
    """Linear warmup then cosine decay to 10% of the peak (A.2.3)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def step_row(run_id: str, step: int, attempt: int, total: int, rng, spike: bool) -> dict:
    """One plausible `train_steps` row: per-track losses decaying over `total` steps (nats
    per token), LR schedule, grad norm (x6 on a spike), cumulative tokens per dataset."""
    frac = step / max(1, total)
    row: dict = {"run_id": run_id, "step": step, "attempt": attempt}
    row["stage"] = "stage1" if frac < 0.5 else "stage2"
    tot = 0.0
    for track, (a, b) in TRACK_LOSS.items():
        v = b + (a - b) * math.exp(-5 * frac) + rng.normal(0, 0.02 * b)
        if spike:
            v *= 1.8
        row[track] = v
        tot += v
    row["loss"] = tot
    row["lr"] = lr_at(step, total=total)
    g = 0.6 + 0.8 * math.exp(-8 * frac) + abs(rng.normal(0, 0.15))
    row["grad_norm"] = g * (6.0 if spike else 1.0)
    row["clipped"] = row["grad_norm"] > 1.0
    row["skipped"] = False
    row["update_ratio"] = row["lr"] * 2.5 * min(1.0, row["grad_norm"]) + abs(rng.normal(0, 5e-5))
    row["max_attn_logit"] = 12 + 10 * frac + rng.normal(0, 0.5) + (15 if spike else 0)
    row["tokens"] = BATCH_TOKENS
    row["tokens_seen"] = (step + 1) * BATCH_TOKENS
    row["tokens_by_dataset"] = {d: int(w * row["tokens_seen"]) for d, w in MIX.items()}
    row["step_time_s"] = 0.9 + abs(rng.normal(0, 0.05))
    row["data_wait_s"] = abs(rng.normal(0.01, 0.005))
    row["tokens_per_s"] = BATCH_TOKENS / row["step_time_s"]
    row["mfu"] = 0.42 + rng.normal(0, 0.01)
    row["mem_peak_gb"] = 61.5 + rng.normal(0, 0.3)
    row["time"] = T0 + timedelta(seconds=step)
    return row


def write_train_run(
    workspace: str | Path,
    run_id: str,
    *,
    steps: int = 600,
    seed: int = 0,
    status: str = "RUNNING",
    nodes: int = 2,
    flush_rows: int = 250,
) -> SimRun:
    """One training run: runs/jobs records, its train_steps and its events."""
    ws = Path(workspace)
    rng = np.random.default_rng(seed)
    budget = 2 * steps * BATCH_TOKENS
    sim = SimRun(run_id=run_id, steps=steps, token_budget=budget)
    cfg = {"model": {"d_model": 1536, "n_layers": 48}, "optim": {"grad_clip": 1.0, "lr": 4e-4}}
    base = {
        "run_id": run_id,
        "kind": "train",
        "name": f"esm3-1.4b {run_id}",
        "cluster": "slurm-local",
        "config": cfg,
        "git_rev": "0123abc",
        "image": "esm3-suite:latest",
        "slurm_job_id": "101,102",
        "nodes": nodes,
        "world_size": nodes * 4,
        "param_count": 1_400_000_000,
        "token_budget": budget,
        "submitted_at": T0 - timedelta(minutes=5),
    }
    write_rows(
        ws, "runs", [{**base, "status": "SUBMITTED", "updated_at": T0 - timedelta(minutes=5)}]
    )
    write_rows(ws, "runs", [{**base, "status": "RUNNING", "started_at": T0, "updated_at": T0}])

    sim.spike_step = int(steps * 0.35)
    sim.nonfinite_step = int(steps * 0.6)
    sim.rollback = (int(steps * 0.8), int(steps * 0.75))
    sim.stage_step = steps // 2
    events: list[dict] = []

    def ev(step, kind, severity, message, value=None, detail=None):
        events.append(
            {
                "run_id": run_id,
                "step": step,
                "kind": kind,
                "severity": severity,
                "message": message,
                "value": value,
                "detail": detail,
                "time": T0 + timedelta(seconds=step),
            }
        )

    with LakeWriter(ws, "train_steps", flush_rows=flush_rows, background=False) as w:
        # attempt 0 runs to the rollback point, attempt 1 recomputes from the checkpoint
        plan = [(0, range(0, sim.rollback[0] + 1)), (1, range(sim.rollback[1], steps))]
        for attempt, rng_steps in plan:
            for step in rng_steps:
                spike = step == sim.spike_step or (attempt == 0 and step >= sim.rollback[0] - 3)
                row = step_row(run_id, step, attempt, steps, rng, spike)
                if step == sim.nonfinite_step:
                    row["loss"] = float("nan")
                    row["loss_structure"] = float("nan")
                    row["grad_norm"] = float("inf")
                    row["skipped"] = True
                    row["clipped"] = False
                w.add(row)
                sim.rows_written += 1
                sim.last_step, sim.last_loss = step, row["loss"]
                sim.tokens_seen = row["tokens_seen"]
                sim.tokens_by_dataset = row["tokens_by_dataset"]
                if step == sim.spike_step and attempt == 0:
                    ev(step, "spike", "warning", "loss spike: 1.8x the running mean", row["loss"])
                if step == sim.nonfinite_step:
                    ev(step, "nonfinite", "error", "non-finite loss in track structure", None)
                    ev(step, "skip", "warning", "optimizer step skipped", None)
                if step % 100 == 0 and step > 0 and attempt == 0:
                    ev(step, "checkpoint", "info", f"checkpoint at step {step}")
                if step % 100 == 99:
                    val = {k: v * 1.03 for k, v in row.items() if k.startswith("loss_")}
                    total = float(np.nansum(list(val.values())))
                    ev(step, "validation", "info", "validation loss", total, val)
                if step == sim.stage_step and attempt == 0:
                    ev(step, "stage", "info", "stage2: context 2048, structure mix up")
        ev(
            sim.rollback[0],
            "rollback",
            "warning",
            f"3 spikes in a row: rolled back to step {sim.rollback[1]}",
            float(sim.rollback[1]),
        )
        ev(sim.rollback[0], "requeue", "info", "job requeued after rollback (attempt 1)")
    write_rows(ws, "events", events)

    jobs = []
    for rank in range(nodes):
        node = f"node{rank + 1}"
        common = {"run_id": run_id, "stage": "train", "job_id": "101", "rank": rank}
        common |= {"node": node, "cluster": "slurm-local", "submitted_at": T0}
        jobs.append(
            {**common, "attempt": 0, "state": "RUNNING", "started_at": T0, "updated_at": T0}
        )
        t1 = T0 + timedelta(seconds=sim.rollback[0])
        jobs.append(
            {**common, "attempt": 0, "state": "REQUEUED", "started_at": T0, "ended_at": t1}
            | {"updated_at": t1, "exit_code": 0}
        )
        jobs.append(
            {**common, "attempt": 1, "state": "RUNNING", "started_at": t1, "updated_at": t1}
        )
    write_rows(ws, "jobs", jobs)
    if status != "RUNNING":
        t_end = T0 + timedelta(seconds=steps)
        write_rows(
            ws,
            "runs",
            [
                {**base, "status": status, "started_at": T0, "finished_at": t_end}
                | {"updated_at": t_end}
            ],
        )
        write_rows(
            ws,
            "jobs",
            [
                {"run_id": run_id, "stage": "train", "job_id": "101", "rank": r, "attempt": 1}
                | {"node": f"node{r + 1}", "state": status, "exit_code": 0, "updated_at": t_end}
                | {"started_at": T0 + timedelta(seconds=sim.rollback[0]), "ended_at": t_end}
                for r in range(nodes)
            ],
        )
    return sim


def write_preprocess_run(workspace: str | Path, run_id: str = "prep-seq-01") -> dict:
    """A preprocessing array (8 tasks, one failing for good, one requeued), Tables S3/S4,
    and rejected records. Returns the expected counts."""
    ws = Path(workspace)
    write_rows(
        ws,
        "runs",
        [
            {"run_id": run_id, "kind": "preprocess", "name": "preprocess sequences"}
            | {"status": "RUNNING", "cluster": "slurm-local", "nodes": 2, "world_size": 8}
            | {"submitted_at": T0 - timedelta(hours=2), "updated_at": T0 - timedelta(hours=2)}
        ],
    )
    jobs = []
    err = "ToolError: mmseqs easy-linclust exited 137: Killed (out of memory) on shard 5"
    for i in range(8):
        j = {"run_id": run_id, "stage": "sequences", "job_id": f"90_{i}", "array_index": i}
        j |= {"rank": 0, "node": f"node{i % 2 + 1}", "cluster": "slurm-local"}
        t = T0 - timedelta(hours=2) + timedelta(minutes=i)
        jobs.append({**j, "attempt": 0, "state": "RUNNING", "started_at": t, "updated_at": t})
        end = t + timedelta(minutes=20)
        if i == 5:
            jobs.append(
                {**j, "attempt": 0, "state": "FAILED", "exit_code": 137, "error": err}
                | {"started_at": t, "ended_at": end, "updated_at": end}
            )
        elif i == 3:
            jobs.append(
                {**j, "attempt": 0, "state": "REQUEUED", "started_at": t, "ended_at": end}
                | {"updated_at": end}
            )
            jobs.append(
                {**j, "attempt": 1, "state": "COMPLETED", "exit_code": 0}
                | {"started_at": end, "ended_at": end + timedelta(minutes=15)}
                | {"updated_at": end + timedelta(minutes=15)}
            )
        else:
            jobs.append(
                {**j, "attempt": 0, "state": "COMPLETED", "exit_code": 0, "started_at": t}
                | {"ended_at": end, "updated_at": end}
            )
    write_rows(ws, "jobs", jobs)

    s3 = []
    for ds, typ, cl, cc, el, ec, tokens, rel in TABLE_S3:
        seqs = ec or cc
        s3.append(
            {"run_id": run_id, "dataset": ds, "type": typ, "clustering_level": cl}
            | {"clustering_count": int(cc), "expansion_level": el}
            | {"expansion_count": int(ec) if ec else None, "sequences": int(seqs)}
            | {"avg_length": tokens / seqs, "tokens": int(tokens), "release": rel}
        )
    write_rows(ws, "dataset_stats", s3)
    write_rows(
        ws,
        "token_stats",
        [
            {"run_id": run_id, "dataset": ds, "type": typ, "unique_samples": s * 1e6}
            | {"unique_tokens": t * 1e6, "repeats": 1.0}
            for ds, typ, s, t in TABLE_S4
        ],
    )
    reasons = {"too_short": 7, "invalid_residue": 3, "duplicate_id": 2}
    rej = []
    for reason, n in reasons.items():
        for k in range(n):
            rej.append(
                {"run_id": run_id, "stage": "sequences", "source": "uniref50_shard_003.fasta"}
                | {"record": f"UniRef50_A{k:05d}", "reason": reason}
                | {"detail": f"{reason.replace('_', ' ')} at record {k}"}
            )
    write_rows(ws, "rejects", rej)
    return {"tasks": 8, "failed": 1, "error": err, "rejects": reasons}


def seed(workspace: str | Path, *, steps: int = 600, runs: int = 2) -> dict[str, SimRun]:
    """A whole demo workspace: one preprocessing run and `runs` training runs."""
    ws = Path(workspace)
    ensure_lake(ws)
    write_preprocess_run(ws)
    out = {}
    for i in range(runs):
        rid = f"train-{chr(ord('a') + i)}"
        out[rid] = write_train_run(
            ws,
            rid,
            steps=steps + 100 * i,
            seed=i,
            status="RUNNING" if i == 0 else "COMPLETED",
            nodes=2,
        )
    return out


def main() -> None:  # python -m dashboard.demo_data WORKSPACE [STEPS]
    import sys

    ws = Path(sys.argv[1] if len(sys.argv) > 1 else "workspace")
    steps = int(sys.argv[2]) if len(sys.argv) > 2 else 2000
    sims = seed(ws, steps=steps)
    print(json.dumps({k: v.last_step for k, v in sims.items()}))


if __name__ == "__main__":
    main()
