"""Array splitting on a real SLURM cluster of its own, configured with MaxArraySize=11:
a stage of 50 tasks runs as five arrays, and every array of the stage after it waits on
all five (its own cluster folder and ports: the shared test cluster is not disturbed)."""

from __future__ import annotations

import os
import re
import shutil
import socket

import pytest

from esm3.metrics.catalog import query
from jobs import launch, slurm_local
from jobs import workspace as wsp
from jobs.clusters import Resources, load_profile
from jobs.stages.runner import Stage, run_stages
from tests.platform import jobfns

pytestmark = pytest.mark.slurm


def _free_base_port() -> int:
    """A port p with p .. p+2 free (slurmctld, then one slurmd per node)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + 2 < 65536 and all(_free(p) for p in (base + 1, base + 2)):
            return base
    raise RuntimeError("no three consecutive free ports")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.fixture(scope="module")
def small_arrays_cluster(tmp_path_factory):
    if not shutil.which("sbatch") or not shutil.which("slurmctld"):
        pytest.skip("SLURM is not installed (make setup installs slurm-wlm)")
    root = tmp_path_factory.mktemp("slurm-arrays")
    port = int(os.environ.get("ESM3_TEST_SLURM_PORT") or _free_base_port())
    with pytest.MonkeyPatch.context() as env:
        # the `slurm-local` profile (and the records' reconciliation, which loads it by
        # name) points at this cluster while the module runs
        env.setenv("ESM3_SLURM_DIR", str(root))
        env.setenv("ESM3_SLURM_PORT", str(port))
        c = slurm_local.up(root=root, port=port, settings={"MaxArraySize": "11"})
        try:
            yield c
        finally:
            slurm_local.down(root=root)


def _dependencies(folder) -> dict[str, str]:
    """array id -> the --dependency its submitted script carried ("" for none)."""
    out = {}
    for script in folder.rglob("*_submission.sh"):
        m = re.search(r"^#SBATCH --dependency=(\S+)$", script.read_text(), re.MULTILINE)
        out[script.name.split("_")[0]] = m.group(1).strip("'") if m else ""
    return out


def test_stage_above_max_array_size_runs_as_dependent_arrays(small_arrays_cluster, workspace):
    prof = load_profile("slurm-local")
    assert prof.slurm_conf_path() == small_arrays_cluster.conf
    assert launch.array_size_limit(prof) == 11  # read from `scontrol show config`
    run_id = launch.start_run(workspace, kind="test", name="arrays", profile=prof)
    stages = [
        Stage("first", jobfns.stage_square, [(str(workspace), run_id, i) for i in range(50)]),
        Stage("second", jobfns.stage_square, [(str(workspace), run_id, i) for i in range(25)], ["first"],
              Resources(items_per_task=2)),
    ]  # fmt: skip
    results = run_stages(workspace, prof, run_id, stages, timeout_s=600)
    assert [r["y"] for r in results["first"]] == [i * i for i in range(50)]
    assert [r["y"] for r in results["second"]] == [i * i for i in range(25)]

    jobs = query(workspace, "SELECT stage, job_id, array_index, state, started_at, ended_at "
                 "FROM jobs WHERE run_id = ? ORDER BY stage, array_index", [run_id])  # fmt: skip
    assert set(jobs.state) == {"COMPLETED"}
    first, second = jobs[jobs.stage == "first"], jobs[jobs.stage == "second"]
    assert first.array_index.tolist() == list(range(50))
    assert second.array_index.tolist() == list(range(13))  # 25 items, 2 per task
    first_arrays = list(dict.fromkeys(j.split("_")[0] for j in first.job_id))
    second_arrays = list(dict.fromkeys(j.split("_")[0] for j in second.job_id))
    assert len(first_arrays) == 5 and len(second_arrays) == 2  # at most 10 tasks each
    assert all(int(j.split("_")[1]) < 10 for j in jobs.job_id)

    deps = _dependencies(wsp.submitit_folder(workspace, run_id))
    assert {a: deps[a] for a in first_arrays} == dict.fromkeys(first_arrays, "")
    wanted = "afterok:" + ":".join(first_arrays)
    assert {a: deps[a] for a in second_arrays} == dict.fromkeys(second_arrays, wanted)
    assert second.started_at.min() >= first.ended_at.max()  # the scheduler held them

    recorded = query(workspace, "SELECT slurm_job_id FROM runs WHERE run_id = ?", [run_id])
    assert recorded.slurm_job_id[0].split(",") == first_arrays + second_arrays
