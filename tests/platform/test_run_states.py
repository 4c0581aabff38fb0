"""Job and run states that tell the truth on the real local SLURM cluster: a cancelled
array task is reported at once with SLURM's own line, and a run keeps every stage's id."""

from __future__ import annotations

import subprocess

import pytest

from esm3.metrics.catalog import query
from jobs import launch
from jobs.clusters import load_profile
from tests.platform import jobfns
from tests.waiting import wait_for


def _running(ws, run_id: str) -> int:
    df = query(
        ws, "SELECT count(*) AS n FROM jobs WHERE run_id = ? AND state = 'RUNNING'", [run_id]
    )
    return int(df.n[0])


@pytest.mark.slurm
def test_cancelled_array_task_is_reported_at_once_with_its_real_error(slurm_cluster, workspace):
    profile = load_profile("slurm-local")
    run_id = launch.start_run(workspace, kind="test", name="t", profile=profile)
    sub = launch.submit_array(
        workspace,
        profile,
        run_id=run_id,
        stage="purge",
        fn=jobfns.busy_with_progress,
        items=[(120,), (120,), (120,)],
    )
    env = slurm_cluster.env()
    try:
        wait_for(lambda: _running(workspace, run_id) == 3, 60, "all three tasks running")
        victim = sub.job_ids[1]
        subprocess.run(["scancel", victim], check=True, env=env)
        # at once: the siblings run 120 s, so waiting for them would end in TimeoutError
        with pytest.raises(launch.JobFailed) as err:
            sub.wait(timeout_s=60)
    finally:
        subprocess.run(["scancel", sub.job_ids[0].split("_")[0]], env=env, check=False)
    msg = str(err.value)
    assert err.value.state == "CANCELLED"
    assert f"job {victim} is CANCELLED" in msg
    assert "CANCELLED AT" in msg and "***" in msg and "[===" not in msg, msg
    jobs = query(workspace, "SELECT job_id, state, error FROM jobs WHERE run_id = ?", [run_id])
    rec = jobs[jobs.job_id == victim].iloc[0]
    assert rec.state == "CANCELLED" and "Traceback" not in rec.error


@pytest.mark.slurm
def test_run_keeps_every_stage_job_id(slurm_cluster, workspace):
    profile = load_profile("slurm-local")
    run_id = launch.start_run(workspace, kind="test", name="t", profile=profile)
    ids = []
    for stage in ("first", "second"):
        sub = launch.submit_array(
            workspace, profile, run_id=run_id, stage=stage, fn=jobfns.square, items=[(2,), (3,)]
        )
        assert [r["y"] for r in sub.wait(timeout_s=120)] == [4, 9]
        ids.append(sub.job_ids[0].split("_")[0])
    runs = query(workspace, "SELECT slurm_job_id, status FROM runs WHERE run_id = ?", [run_id])
    assert runs.slurm_job_id[0] == ",".join(ids) and ids[0] != ids[1]
    assert runs.status[0] == "COMPLETED"
