"""Run and job states of `esm3 train` on the real local SLURM cluster when the scheduler
stops the job: scancel is CANCELLED (no DataLoader traceback), a downed node requeues the
job while the submitter keeps waiting, a killed attempt is never COMPLETED."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from esm3.metrics.catalog import query
from tests.slurm_requeue import restore_cluster, running_again
from tests.train.conftest import write_config
from tests.waiting import wait_for

STAGES = """
[[stages]]
name = "seq"
steps = 6
context_length = 64
tracks = ["sequence"]
[[stages]]
name = "all"
steps = 34
context_length = 128
"""
OVER = ["checkpoint.every=4", "data.workers=1", "parallel.threads=1"]


def _train(ws: Path, train_data: Path, env: dict[str, str], *extra: str) -> subprocess.Popen:
    cfg = write_config(ws / "c.toml", train_data, stages=STAGES)
    cmd = [sys.executable, "-m", "jobs.cli", "train", "--config", str(cfg), "-w", str(ws),
           "-c", "slurm-local", "--nodes", "2", "--tasks-per-node", "1", *extra, *OVER]  # fmt: skip
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _one(ws: Path, sql: str, params: list) -> object:
    df = query(ws, sql, params)
    return df.iloc[0, 0] if len(df) else None


def _run_and_job(ws: Path) -> tuple[str, str]:
    def found() -> tuple[str, str] | None:
        df = query(ws, "SELECT run_id, job_id FROM jobs WHERE stage = 'train' LIMIT 1")
        return (df.run_id[0], df.job_id[0]) if len(df) else None

    return wait_for(found, 120, "the training job's record")


def _training(ws: Path, run_id: str, steps: int) -> None:
    sql = "SELECT count(*) FROM train_steps WHERE run_id = ?"
    wait_for(lambda: _one(ws, sql, [run_id]) >= steps, 180, f"{steps} steps of {run_id}")


def _attempts(ws: Path, run_id: str) -> list[tuple[int, int, str]]:
    df = query(ws, "SELECT attempt, rank, state FROM jobs WHERE run_id = ? AND state != "
               "'SUBMITTED' ORDER BY attempt, rank", [run_id])  # fmt: skip
    return [tuple(r) for r in df.itertuples(index=False)]


@pytest.mark.slurm
def test_scancel_of_training_is_cancelled_without_a_dataloader_traceback(
    slurm_cluster, train_data, workspace
):
    env = {**os.environ, **slurm_cluster.env()}
    proc = _train(workspace, train_data, env)
    try:
        run_id, job = _run_and_job(workspace)
        _training(workspace, run_id, 2)
        subprocess.run(["scancel", job], check=True, env=env)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0 and "CANCELLED" in err and "DataLoader" not in err, err
    assert _one(workspace, "SELECT status FROM runs WHERE run_id = ?", [run_id]) == "CANCELLED"
    assert {s for _, _, s in _attempts(workspace, run_id)} == {"CANCELLED"}
    errors = query(workspace, "SELECT coalesce(error, '') AS e FROM jobs_history "
                   "WHERE run_id = ?", [run_id]).e  # fmt: skip
    assert not errors.str.contains("DataLoader|Traceback").any(), errors.tolist()


@pytest.mark.slurm
def test_downed_node_requeues_and_the_submitter_waits_to_completion(
    slurm_cluster, train_data, workspace
):
    env = {**os.environ, **slurm_cluster.env()}
    proc = _train(workspace, train_data, env)
    job = None
    try:
        run_id, job = _run_and_job(workspace)
        _training(workspace, run_id, 6)
        subprocess.run(["scontrol", "update", "nodename=node1", "state=down", "reason=test"],
                       check=True, env=env)  # fmt: skip
        wait_for(lambda: [s for a, _, s in _attempts(workspace, run_id) if a == 0]
                 == ["REQUEUED", "REQUEUED"], 60, "both ranks of attempt 0 REQUEUED")  # fmt: skip
        restore_cluster(slurm_cluster, env, None)  # node1 back: slurmd never stopped
        assert proc.poll() is None, "the submitter gave up on a requeued job"
        wait_for(lambda: running_again(job, env), 180, f"job {job} running again", interval=1)
        out, err = proc.communicate(timeout=240)
        job = None  # finished: nothing to cancel
    finally:
        if proc.poll() is None:
            proc.kill()
        restore_cluster(slurm_cluster, env, job)
    assert proc.returncode == 0, err
    assert "COMPLETED" in _one(workspace, "SELECT status FROM runs WHERE run_id = ?", [run_id])
    states = _attempts(workspace, run_id)
    assert [s for a, _, s in states if a == 0] == ["REQUEUED", "REQUEUED"], states
    assert [s for a, _, s in states if a == 1] == ["COMPLETED", "COMPLETED"], states
    steps = query(workspace, "SELECT step FROM train_steps WHERE run_id = ? ORDER BY step",
                  [run_id]).step.tolist()  # fmt: skip
    assert steps == list(range(1, 41))


def _rank_pids(job: str) -> list[int]:
    """The job's rank processes (and their DataLoader workers) on this host."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes()
            environ = (d / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"submitit" in cmd and f"SLURM_JOB_ID={job}".encode() in environ:
            pids.append(int(d.name))
    return pids


@pytest.mark.slurm
def test_killed_attempt_then_requeued_is_not_completed(slurm_cluster, train_data, workspace):
    env = {**os.environ, **slurm_cluster.env()}
    proc = _train(workspace, train_data, env, "--no-wait")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    run_id = out.strip().splitlines()[-1]
    job = _one(workspace, "SELECT job_id FROM jobs WHERE run_id = ?", [run_id])
    _training(workspace, run_id, 2)
    pids = _rank_pids(job)
    assert len(pids) >= 2, pids
    for pid in pids:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass

    def requeued() -> bool:  # SLURM refuses to requeue a job until its steps have ended
        r = subprocess.run(["scontrol", "requeue", job], capture_output=True, env=env)
        return r.returncode == 0

    try:
        wait_for(requeued, 60, f"scontrol requeue {job} accepted", interval=1)
        wait_for(lambda: running_again(job, env), 180, f"job {job} running again", interval=1)
        status = [sys.executable, "-m", "jobs.cli", "status", run_id, "-w", str(workspace)]
        wait_for(
            lambda: (
                subprocess.run(status, env=env, capture_output=True).returncode == 0
                and _one(workspace, "SELECT status FROM runs WHERE run_id = ?", [run_id])
                == "COMPLETED"
            ),
            240,
            f"run {run_id} COMPLETED by its requeued attempt",
            interval=2,
        )
    finally:
        restore_cluster(slurm_cluster, env, job)
    states = _attempts(workspace, run_id)
    assert [s for a, _, s in states if a == 1] == ["COMPLETED", "COMPLETED"], states
    killed = [s for a, _, s in states if a == 0]
    assert len(killed) == 2 and "COMPLETED" not in killed, states
