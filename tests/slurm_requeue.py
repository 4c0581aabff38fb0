"""Requeues on the shared local SLURM cluster, for tests that requeue a job (a downed
node, `scontrol requeue`, a preemption): release SLURM's hold on the requeued job only once
its old attempt is gone, and leave the cluster as the test found it."""

from __future__ import annotations

import subprocess
from pathlib import Path

from jobs import slurm_local
from tests.waiting import wait_for


def stepds(job: str) -> list[int]:
    """slurmstepd processes still serving `job` on this host: an old attempt's remains."""
    found = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and f"slurmstepd: [{job}.".encode() in (d / "cmdline").read_bytes():
                found.append(int(d.name))
        except OSError:
            continue
    return found


def running_again(job: str, env: dict[str, str]) -> bool:
    """True once the requeued job runs again. SLURM holds a requeued job ~2 minutes
    (BeginTime); once no step of the old attempt is left on any node, let it start now.
    A slurmd may still count the old attempt for a moment after its last step is gone: it
    then drains its node ('Duplicate jobid') and SLURM requeues the job again; such a node
    is put back in service and the job released again, so the wait converges."""
    out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T %r"], capture_output=True,
                         text=True, env=env).stdout  # fmt: skip
    if "BeginTime" in out and not stepds(job):
        resume_duplicate_drains(env)
        subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"], env=env)
    return out.startswith("RUNNING")


def resume_duplicate_drains(env: dict[str, str]) -> list[str]:
    """Resume the nodes SLURM drained for a duplicate job id; returns their names."""
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N|%E"], capture_output=True, text=True,
                         env=env).stdout  # fmt: skip
    nodes = sorted({line.split("|", 1)[0] for line in out.splitlines()
                    if "Duplicate jobid" in line})  # fmt: skip
    for node in nodes:
        subprocess.run(["scontrol", "update", f"nodename={node}", "state=resume"], env=env,
                       capture_output=True)  # fmt: skip
    return nodes


def restore_cluster(cluster, env: dict[str, str], job: str | None) -> None:
    """Leave the shared cluster as the test found it: the job gone, every node in service
    (a node a failed test left drained would hold up every later SLURM test)."""
    if job:
        subprocess.run(["scancel", job], env=env, capture_output=True)
        wait_for(lambda: not stepds(job), 60, f"the steps of job {job} to end", interval=1)

    def in_service() -> bool:
        states = slurm_local.sinfo_states(cluster)
        out = [n for n, st in states.items() if st in ("drained", "draining", "down", "fail")]
        for node in out:
            subprocess.run(["scontrol", "update", f"nodename={node}", "state=resume"], env=env,
                           capture_output=True)  # fmt: skip
        return bool(states) and not out

    wait_for(in_service, 60, "every node back in service", interval=1)
