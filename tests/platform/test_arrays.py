"""Arrays sized for the scheduler: items grouped into tasks, tasks into arrays of at most
MaxArraySize - 1, with each array depending on every array of the stages it needs."""

from __future__ import annotations

from pathlib import Path

import pytest

from esm3.metrics.catalog import query
from jobs import arrays, launch
from jobs.clusters import Resources, load_profile
from jobs.stages.runner import Stage, plan_scripts, run_stages
from tests.platform import jobfns

EXPECTED = Path(__file__).parent.parent / "expected"


def test_plan_fits_the_limit_and_chunks_past_the_task_cap():
    plan = arrays.plan_arrays(5000, max_array_size=1001)
    assert (plan.n_tasks, plan.items_per_task) == (5000, 1)
    assert [(a.start, a.stop) for a in plan.arrays] == [
        (k * 1000, (k + 1) * 1000) for k in range(5)
    ]
    # 2 x 10^5 shards against a cap of 10^4 tasks: 20 shards per task, 10 full arrays
    big = arrays.plan_arrays(200_000, max_array_size=1001, max_tasks=10_000)
    assert (big.items_per_task, big.n_tasks, len(big.arrays)) == (20, 10_000, 10)
    odd = arrays.plan_arrays(23, max_array_size=11, items_per_task=2)
    assert [len(a) for a in odd.arrays] == [10, 2]
    assert odd.items_of(11) == range(22, 23)
    assert odd.describe() == "23 item(s) in 12 task(s) of <= 2, 2 array(s) of 10 (last 2)"
    with pytest.raises(ValueError, match="allows no array task"):
        arrays.plan_arrays(3, max_array_size=1)


def test_max_array_size_is_read_from_scontrol_output():
    text = (
        "MailProg                = /bin/mail\nMaxArraySize            = 11\nMaxJobCount = 10000\n"
    )
    assert arrays.parse_max_array_size(text) == 11
    assert arrays.parse_max_array_size("MaxJobCount = 10000\n") is None
    prof = load_profile("site-example", ["max_array_size=300"])
    assert launch.array_size_limit(prof) == 300  # the profile's key wins, scheduler not asked


class Squares:
    """An ItemSource: items described by a count, read per range inside the task."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def rows(self, start: int, stop: int) -> list[tuple]:
        return [(i,) for i in range(start, stop)]


def test_a_chunk_runs_on_a_process_pool_in_item_order(monkeypatch):
    monkeypatch.setenv("ESM3_JOB_CPUS", "2")
    chunk = arrays.chunk_of(Squares(100), range(40, 45))
    assert chunk.listed is None  # the task reads its range, nothing listed at submission
    out = arrays.RunChunk("square", jobfns.square)(chunk)
    assert [r["y"] for r in out] == [i * i for i in range(40, 45)]
    bad = arrays.chunk_of([("a",), ("b",), ("c",)], range(1, 3))
    with pytest.raises(arrays.ItemFailed, match=r"^explode item 1 \('b',\): ValueError: b$"):
        arrays.RunChunk("explode", jobfns.boom)(bad)


def test_site_plan_of_5000_tasks_matches_recorded_scripts(tmp_path):
    """The sbatch scripts of a 5,000-task stage (and a stage after it) against
    MaxArraySize 1001: five arrays of 1000, each of the next stage's arrays waiting on all
    five. Any change in what would be submitted shows up as a diff here."""
    prof = load_profile("site-example", ["max_array_size=1001"])
    stages = [
        Stage("structures", jobfns.square, [(i,) for i in range(5000)]),
        Stage("tokens", jobfns.square, [(i,) for i in range(3000)], ["structures"],
              Resources(items_per_task=2)),
    ]  # fmt: skip
    scripts = plan_scripts(Path("/ws"), prof, tmp_path / "sub", stages, max_array_size=1001)
    text = "".join(f"### {title}\n{script}\n" for title, script in scripts)
    text = text.replace(str(tmp_path / "sub"), "FOLDER")
    assert [t for t, _ in scripts] == [
        *(f"structures#{k}" for k in range(5)),
        "tokens#0",
        "tokens#1",
    ]
    assert text == (EXPECTED / "sbatch_plan_5000.sh").read_text()


def _jobs(ws, run_id):
    return query(ws, "SELECT * FROM jobs WHERE run_id = ? ORDER BY stage, array_index",
                 [run_id])  # fmt: skip


def test_local_stage_of_several_arrays_returns_every_item_in_order(workspace):
    prof = load_profile("local", ["max_array_size=3"])
    run_id = launch.start_run(workspace, kind="test", name="t", profile=prof)
    stages = [Stage("square", jobfns.stage_square, [(str(workspace), run_id, i) for i in range(7)], [],
                    Resources(items_per_task=2))]  # fmt: skip
    results = run_stages(workspace, prof, run_id, stages, timeout_s=180)
    assert [r["y"] for r in results["square"]] == [i * i for i in range(7)]
    jobs = _jobs(workspace, run_id)
    assert jobs.array_index.tolist() == [0, 1, 2, 3]  # 4 tasks in arrays of 2, 2
    assert set(jobs.state) == {"COMPLETED"}


def test_local_failure_names_stage_job_and_item(workspace):
    prof = load_profile("local")
    run_id = launch.start_run(workspace, kind="test", name="t", profile=prof)
    stages = [Stage("explode", jobfns.stage_boom, [(str(workspace), run_id, "fine"), (str(workspace), run_id, "bad")], [],
                    Resources(items_per_task=2))]  # fmt: skip
    with pytest.raises(launch.JobFailed) as err:
        run_stages(workspace, prof, run_id, stages, timeout_s=180)
    assert str(err.value).startswith("explode: job ")
    assert (
        f"ItemFailed: explode item 0 ('{workspace}', '{run_id}', 'fine'): ValueError: fine"
        in str(err.value)
    )
