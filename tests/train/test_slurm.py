"""The training job on the real local SLURM cluster (CPU, gloo): a 2-node x 1-task FSDP run
on real shards, then the same run preempted with USR2, requeued and resumed."""

from __future__ import annotations

import subprocess

import pytest

from esm3.metrics.catalog import query
from jobs.clusters import load_profile
from jobs.train.config import load_config
from jobs.train.submit import run_training, submit
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
steps = 20
context_length = 128
"""
OVER = ["checkpoint.every=4", "data.workers=1", "parallel.threads=1"]


@pytest.fixture(scope="module")
def reference(slurm_cluster, train_data, tmp_path_factory):
    from jobs.workspace import prepare

    ws = prepare(tmp_path_factory.mktemp("ws-ref"))
    cfg = load_config(write_config(ws / "c.toml", train_data, stages=STAGES), OVER)
    run_id, results = run_training(
        ws, load_profile("slurm-local"), cfg, nodes=2, tasks_per_node=1, timeout_s=400
    )
    return ws, run_id, results[0], cfg


@pytest.mark.slurm
def test_two_node_fsdp_run_on_real_data(reference):
    ws, run_id, per_rank, cfg = reference
    assert [r["rank"] for r in per_rank] == [0, 1] and {r["node"] for r in per_rank} == {
        "node1",
        "node2",
    }
    steps = query(ws, "SELECT * FROM train_steps WHERE run_id = ? ORDER BY step", [run_id])
    assert steps.step.tolist() == list(range(1, 27))
    first, last = steps.loss.iloc[:3].mean(), steps[steps.stage == "seq"].loss.iloc[-3:].mean()
    assert last < first, (first, last)  # loss falls within the sequence-only stage
    assert steps.loss.tolist() == [per_rank[0]["losses"][s] for s in range(1, 27)]
    assert (steps.tokens > 0).all() and (steps.data_wait_s >= 0).all()
    runs = query(ws, "SELECT * FROM runs WHERE run_id = ?", [run_id])
    r = runs.iloc[0]
    assert (r.status, r.world_size, r.nodes, r.kind) == ("COMPLETED", 2, 2, "train")
    assert r.param_count == per_rank[0]["param_count"] and r.git_rev
    jobs = query(ws, "SELECT rank, node, state FROM jobs WHERE run_id = ? ORDER BY rank", [run_id])
    assert jobs.to_dict("records") == [
        {"rank": 0, "node": "node1", "state": "COMPLETED"},
        {"rank": 1, "node": "node2", "state": "COMPLETED"},
    ]
    ev = query(ws, "SELECT kind, step FROM events WHERE run_id = ? ORDER BY time", [run_id])
    assert {"start", "stage", "checkpoint"} <= set(ev.kind)
    assert ev[ev.kind == "stage"].step.tolist() == [0, 6]


@pytest.mark.slurm
def test_preempted_run_requeues_resumes_and_matches(reference, slurm_cluster, tmp_path):
    from jobs.workspace import prepare

    _, _, ref_ranks, cfg = reference
    ws = prepare(tmp_path / "ws")
    run_id, sub = submit(ws, load_profile("slurm-local"), cfg, nodes=2, tasks_per_node=1)
    job = sub.job_ids[0]
    env = slurm_cluster.env()
    # signal as soon as training has started, so the run is surely still going on a fast
    # machine; the job checkpoints at the next step boundary
    wait_for(
        lambda: len(
            query(ws, "SELECT 1 FROM events WHERE run_id = ? AND kind = 'start'", [run_id])
        ),
        300,
        f"the 'start' event of {run_id}",
    )
    # the scheduler's preemption / time-limit signal, to every rank
    subprocess.run(["scancel", "--signal=USR2", job], check=True, env=env)

    # SLURM holds a requeued job ~2 minutes (credential expiry); let it start as soon as
    # its old attempt is gone, unless it restarted already
    def restarted() -> bool:  # the new attempt has recorded itself
        running_again(job, env)  # releases the hold once the old attempt is gone
        return bool(len(query(ws, "SELECT 1 FROM jobs WHERE run_id = ? AND attempt > 0", [run_id])))

    try:
        wait_for(restarted, 300, f"job {job} requeued and running again", interval=1)
    except BaseException:
        restore_cluster(slurm_cluster, env, job)
        raise
    (per_rank,) = sub.wait(timeout_s=400)
    assert per_rank[0]["resumed_from"] is not None and per_rank[0]["resumed_from"] >= 1
    jobs = query(
        ws,
        "SELECT rank, attempt, state FROM jobs WHERE run_id = ? ORDER BY attempt, rank",
        [run_id],
    )
    recs = [tuple(x) for x in jobs[jobs.state != "SUBMITTED"].itertuples(index=False)]
    assert recs == [
        (0, 0, "REQUEUED"),
        (1, 0, "REQUEUED"),
        (0, 1, "COMPLETED"),
        (1, 1, "COMPLETED"),
    ]
    kinds = set(query(ws, "SELECT kind FROM events WHERE run_id = ?", [run_id]).kind)
    assert {"preempt", "resume", "requeue"} <= kinds
    steps = query(ws, "SELECT step, loss FROM train_steps WHERE run_id = ? ORDER BY step", [run_id])
    assert steps.step.tolist() == list(range(1, 27))
    assert steps.loss.tolist() == [ref_ranks[0]["losses"][s] for s in range(1, 27)]
