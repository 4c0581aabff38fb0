"""`esm3 slurm down` with a job running leaves nothing of its cluster behind, and the next
`esm3 slurm up` comes back with idle nodes, resuming those its own down left drained.

Each test runs a cluster of its own (its own folder and ports, via ESM3_SLURM_DIR and
ESM3_SLURM_PORT), so a failure here cannot drain the cluster other tests share."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from jobs import launch, slurm_local
from jobs.clusters import load_profile
from jobs.workspace import prepare
from tests.platform import jobfns
from tests.waiting import wait_for


def _installed(exe: str) -> bool:
    return bool(shutil.which(exe)) or Path("/usr/sbin", exe).exists()


pytestmark = pytest.mark.skipif(
    not all(_installed(e) for e in ("sbatch", "slurmctld", "slurmd", "munged")),
    reason="SLURM is not installed (make setup installs slurm-wlm and munge)",
)


def _free_ports(first: int = 18817, span: int = 3) -> int:
    """The first port of `span` free consecutive ones (slurmctld, then one per slurmd)."""
    for base in range(first, first + 300, span):
        try:
            for port in range(base, base + span):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise RuntimeError("no free ports for a test SLURM cluster")


@pytest.fixture
def own_cluster(monkeypatch):
    """(root, env) of a cluster of this test's own; stopped and removed afterwards."""
    # a short folder: unix socket paths (munge, step sockets) are limited to 108 bytes
    root = Path(tempfile.mkdtemp(prefix="esm3-slurm-"))
    env = {**os.environ, "ESM3_SLURM_DIR": str(root), "ESM3_SLURM_PORT": str(_free_ports())}
    for k in ("ESM3_SLURM_DIR", "ESM3_SLURM_PORT"):
        monkeypatch.setenv(k, env[k])
    try:
        yield root, env
    finally:
        _esm3(env, "slurm", "down")
        shutil.rmtree(root, ignore_errors=True)


def _esm3(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "jobs.cli", *args], env=env, capture_output=True, text=True,
        timeout=180,
    )  # fmt: skip


def _mentions(root: Path) -> dict[int, str]:
    """Every process (but this one) whose command line or environment names the cluster's
    folder: its daemons, its slurmstepd, and the jobs' shells, srun and tasks."""
    needle, out = str(root).encode(), {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue  # ended, not yet reaped
            cmd = (proc / "cmdline").read_bytes()
            if needle in cmd or needle in (proc / "environ").read_bytes():
                out[int(proc.name)] = cmd.replace(b"\0", b" ").decode(errors="replace")[:120]
        except OSError:
            continue
    return out


def _up(env: dict[str, str]) -> str:
    r = _esm3(env, "slurm", "up")
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_down_with_a_job_running_stops_everything_and_up_comes_back_idle(own_cluster, tmp_path):
    root, env = own_cluster
    assert "idle" in _up(env)
    ws = prepare(tmp_path / "ws")
    profile = load_profile("slurm-local")
    assert profile.slurm_conf_path() == root.resolve() / "etc" / "slurm.conf"
    run_id = launch.start_run(ws, kind="test", name="t", profile=profile)
    launch.submit_job(ws, profile, run_id=run_id, stage="sleep", fn=jobfns.sleep, args=(600,))

    def step_running() -> bool:  # submitit runs the task through srun: step <job>.0
        names = [slurm_local._cmdline(p) for p in slurm_local.cluster_processes(root)]
        return any(n.startswith("slurmstepd") and ".0]" in n for n in names)

    wait_for(step_running, 120, lambda: f"the job's srun step: {_mentions(root)}")
    assert any("srun" in cmd for cmd in _mentions(root).values())

    r = _esm3(env, "slurm", "down")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "cancelled 1 job(s)" in r.stdout and "slurmd-node1" in r.stdout, r.stdout
    assert "STILL RUNNING" not in r.stdout
    wait_for(lambda: not _mentions(root), 30, lambda: f"nothing of the cluster: {_mentions(root)}")
    assert slurm_local.cluster_processes(root) == {}

    assert "idle" in _up(env)
    c = slurm_local.LocalCluster(root.resolve())
    assert {n: st for n, (st, _) in slurm_local.node_info(c).items()} == {
        "node1": "idle",
        "node2": "idle",
    }


def test_up_resumes_a_node_its_own_down_left_drained(own_cluster):
    root, env = own_cluster
    _up(env)
    c = slurm_local.LocalCluster(root.resolve())
    # what slurmctld does to a node whose step could not be killed when its slurmd stopped
    subprocess.run(
        ["scontrol", "update", "nodename=node1", "state=drain", "reason=Kill task failed"],
        env=c.env(), check=True, capture_output=True,
    )  # fmt: skip
    assert slurm_local.node_info(c)["node1"][0] in ("drained", "draining")
    assert _esm3(env, "slurm", "down").returncode == 0

    out = _up(env)
    assert "resumed node1" in out, out
    assert slurm_local.node_info(c)["node1"] == ("idle", "none")
