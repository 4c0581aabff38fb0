import os
import re
from pathlib import Path

import pytest

from jobs.clusters import (
    available_profiles,
    container_python,
    load_profile,
    make_executor,
    task_env_lines,
)
from jobs.config import ConfigError

EXPECTED = Path(__file__).parent.parent / "expected"


def test_profiles_shipped():
    assert {"local", "slurm-local", "site-example"} <= set(available_profiles())
    assert load_profile("local").executor == "local"
    site = load_profile("site-example")
    assert site.executor == "slurm" and site.gpus_per_node == 8 and site.container.image


def test_unknown_profile_and_bad_override():
    with pytest.raises(ConfigError, match="unknown cluster profile 'nope' \\(available: local"):
        load_profile("nope")
    with pytest.raises(ConfigError, match="'nodes': 'two' is not an integer"):
        load_profile("slurm-local", ["nodes=two"])
    with pytest.raises(ConfigError, match="'nodes': 2 is not allowed with executor 'local'"):
        load_profile("local", ["nodes=2"])


def _script(profile, tmp_path):
    ex = make_executor(profile, tmp_path / "sub", workspace=Path("/ws"), job_name="train")
    text = ex._make_submission_file_text(ex._submitit_command_str, "uid")
    return text.replace(str(tmp_path / "sub"), "FOLDER")


def test_site_example_sbatch_script_matches_recorded(tmp_path):
    """Any change in what is submitted to a real site shows up as a diff here."""
    text = _script(load_profile("site-example"), tmp_path)
    expected = (EXPECTED / "sbatch_site_example.sh").read_text()
    assert text == expected


def test_container_wraps_the_jobs_python(tmp_path):
    text = _script(load_profile("site-example"), tmp_path)
    cmd = [ln for ln in text.splitlines() if ln.startswith("srun")][0]
    assert re.search(
        r"apptainer exec --nv --bind /shared/data,/scratch,/ws,FOLDER /shared/images/esm3.sif "
        r"python -u -m submitit.core._submit FOLDER",
        cmd,
    ), cmd
    assert "#SBATCH --gpus-per-node=8" in text and "#SBATCH --signal=USR2@300" in text
    assert "#SBATCH --exclusive" in text.splitlines()


def test_podman_stand_in(tmp_path):
    prof = load_profile("local", ["container.image=esm3-suite:cpu", "container.runtime=podman"])
    cmd = container_python(prof.container, Path("/ws"), Path("/sub"))
    uid = f"{os.getuid()}:{os.getgid()}"
    assert cmd == (
        "podman run --rm --network host --env-host --no-healthcheck "
        f"--user {uid} -v /ws:/ws -v /sub:/sub esm3-suite:cpu python"
    )
    assert container_python(load_profile("local").container, Path("/ws"), Path("/s")) is None


def test_scratch_and_mmseqs_runner_reach_the_tasks(tmp_path):
    """The job script exports them; `$TMPDIR` expands on the node, the runner stays whole."""
    import subprocess

    from jobs.clusters import MMSEQS_RUNNER_ENV, SCRATCH_ENV

    prof = load_profile("site-example", ['scratch="$TMPDIR/esm3"', 'mmseqs_runner="mpirun -np 4"'])
    lines = task_env_lines(prof)
    assert lines and all(ln in _script(prof, tmp_path).splitlines() for ln in lines)
    shell = "\n".join([*lines, f'printf "%s|%s" "${SCRATCH_ENV}" "${MMSEQS_RUNNER_ENV}"'])
    env = {"PATH": os.environ["PATH"], "TMPDIR": "/node/local"}
    out = subprocess.run(["sh", "-c", shell], env=env, capture_output=True, text=True, check=True)
    assert out.stdout == "/node/local/esm3|mpirun -np 4"
    assert task_env_lines(load_profile("local")) == []  # unset: nothing exported
