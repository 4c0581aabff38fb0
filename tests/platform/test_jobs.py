"""Jobs through the same code path as `make submit-*`, on the real local SLURM cluster
and on the local executor; every job records its own lifecycle."""

import subprocess
import sys
from pathlib import Path

import pytest

from esm3.metrics.catalog import query
from jobs import launch
from jobs.clusters import Resources, load_profile
from tests.platform import jobfns
from tests.waiting import wait_for


def _run(ws, profile, kind="test"):
    return launch.start_run(ws, kind=kind, name="t", profile=profile)


def _array(ws, profile):
    run_id = _run(ws, profile)
    sub = launch.submit_array(
        ws, profile, run_id=run_id, stage="square", fn=jobfns.square, items=[(i,) for i in range(4)]
    )
    results = sub.wait(timeout_s=180)
    assert [r["y"] for r in results] == [0, 1, 4, 9]
    jobs = query(ws, "SELECT * FROM jobs WHERE run_id = ? ORDER BY array_index", [run_id])
    assert jobs.array_index.tolist() == [0, 1, 2, 3]
    assert set(jobs.state) == {"COMPLETED"} and set(jobs.exit_code) == {0}
    assert jobs.started_at.notna().all() and jobs.ended_at.notna().all()
    assert (jobs.ended_at >= jobs.started_at).all()
    assert query(ws, "SELECT status FROM runs WHERE run_id = ?", [run_id]).status[0] == "COMPLETED"
    return results, jobs


@pytest.mark.slurm
def test_array_on_slurm(slurm_cluster, workspace):
    results, jobs = _array(workspace, load_profile("slurm-local"))
    assert jobs.job_id.str.fullmatch(r"\d+_[0-3]").all()
    assert set(jobs.node) <= {"node1", "node2"}
    assert [r["node"] for r in results] == jobs.node.tolist()
    slurm_ids = query(workspace, "SELECT slurm_job_id FROM runs").slurm_job_id[0]
    assert slurm_ids == jobs.job_id[0].split("_")[0]


def test_array_on_local(workspace):
    _, jobs = _array(workspace, load_profile("local"))
    assert jobs.job_id.str.fullmatch(r"\d+").all()  # local job ids are process ids
    assert set(jobs.cluster) == {"local"}


@pytest.mark.slurm
def test_two_node_job_all_reduces_over_gloo(slurm_cluster, workspace):
    profile = load_profile("slurm-local")
    run_id = _run(workspace, profile)
    sub = launch.submit_job(
        workspace,
        profile,
        run_id=run_id,
        stage="allreduce",
        fn=jobfns.allreduce,
        resources=Resources(nodes=2, tasks_per_node=1),
    )
    (per_rank,) = sub.wait(timeout_s=240)
    assert [r["rank"] for r in per_rank] == [0, 1]
    assert all(r["world"] == 2 and r["sum"] == 3.0 and r["backend"] == "gloo" for r in per_rank)
    assert {r["node"] for r in per_rank} == {"node1", "node2"}
    jobs = query(
        workspace, "SELECT rank, node, state FROM jobs WHERE run_id = ? ORDER BY rank", [run_id]
    )
    assert jobs.to_dict("records") == [
        {"rank": 0, "node": per_rank[0]["node"], "state": "COMPLETED"},
        {"rank": 1, "node": per_rank[1]["node"], "state": "COMPLETED"},
    ]


@pytest.mark.slurm
def test_failing_job_is_recorded_with_its_error(slurm_cluster, workspace):
    profile = load_profile("slurm-local")
    run_id = _run(workspace, profile)
    sub = launch.submit_job(
        workspace,
        profile,
        run_id=run_id,
        stage="boom",
        fn=jobfns.boom,
        args=("shard 7 is corrupt",),
    )
    with pytest.raises(launch.JobFailed, match="ValueError: shard 7 is corrupt"):
        sub.wait(timeout_s=120)
    job = query(workspace, "SELECT * FROM jobs WHERE run_id = ?", [run_id]).iloc[0]
    assert job.state == "FAILED" and job.exit_code == 1
    assert "ValueError: shard 7 is corrupt" in job.error and "jobfns.py" in job.error
    assert (
        query(workspace, "SELECT status FROM runs WHERE run_id = ?", [run_id]).status[0] == "FAILED"
    )


def _states(ws, run_id) -> list[str]:
    return query(ws, "SELECT state FROM jobs WHERE run_id = ?", [run_id]).state.tolist()


def _wait_state(ws, run_id, state, timeout=60):
    wait_for(
        lambda: (s := _states(ws, run_id)) and set(s) == {state},
        timeout,
        lambda: f"every job of {run_id} to be {state} (now {_states(ws, run_id)})",
    )


def _status_csv(ws, run_id) -> list[str]:
    r = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "status", run_id, "-w", str(ws), "-f", "csv"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()


@pytest.mark.slurm
def test_scancelled_job_shows_as_cancelled(slurm_cluster, workspace):
    profile = load_profile("slurm-local")
    run_id = _run(workspace, profile)
    sub = launch.submit_job(
        workspace, profile, run_id=run_id, stage="sleep", fn=jobfns.sleep, args=(120,)
    )
    _wait_state(workspace, run_id, "RUNNING")
    subprocess.run(["scancel", sub.job_ids[0]], check=True, env=slurm_cluster.env())
    # SLURM shows the job COMPLETING for KillWait seconds, then CANCELLED; `esm3 status`
    # reconciles with the scheduler each time it is asked
    wait_for(
        lambda: "CANCELLED" in _status_csv(workspace, run_id)[1],
        90,
        lambda: f"`esm3 status` to show the run CANCELLED: {_status_csv(workspace, run_id)}",
    )
    job = query(workspace, "SELECT * FROM jobs WHERE run_id = ?", [run_id]).iloc[0]
    # the job says so itself on SLURM's SIGTERM (or reconciliation does, from SLURM's word)
    assert job.state == "CANCELLED" and (
        "SIGTERM from SLURM: cancelled" in job.error or "JobState=CANCELLED" in job.error
    )
    with pytest.raises(launch.JobFailed, match="CANCELLED"):
        sub.wait(timeout_s=30)


def _alive(pid: int) -> bool:
    """Running (a zombie, ended but not yet reaped, is not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_local_job_killed_from_outside_is_lost_not_running(workspace):
    import os
    import signal

    profile = load_profile("local")
    run_id = _run(workspace, profile)
    sub = launch.submit_job(
        workspace, profile, run_id=run_id, stage="sleep", fn=jobfns.sleep, args=(120,)
    )
    _wait_state(workspace, run_id, "RUNNING")
    controller = int(sub.job_ids[0])
    subprocess.run(["pkill", "-KILL", "-P", str(controller)], check=False)  # the task
    os.kill(controller, signal.SIGKILL)
    wait_for(lambda: not _alive(controller), 30, f"the controller {controller} to be gone")
    with pytest.raises(launch.JobFailed, match="LOST"):
        sub.wait(timeout_s=30, poll_s=0.2)
    assert query(workspace, "SELECT state FROM jobs WHERE run_id = ?", [run_id]).state[0] == "LOST"


def test_local_array_tasks_share_the_cores(workspace):
    import os

    profile = load_profile("local")
    run_id = _run(workspace, profile)
    items = [("ESM3_JOB_CPUS",), ("ESM3_WORKSPACE",)]
    sub = launch.submit_array(
        workspace, profile, run_id=run_id, stage="env", fn=os.getenv, items=items
    )
    cpus, ws = sub.wait(timeout_s=120)
    assert int(cpus) == max(1, (os.cpu_count() or 1) // 2)
    assert ws == str(workspace)
