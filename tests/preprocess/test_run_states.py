"""A preprocessing run whose driver is killed is never COMPLETED: its jobs finish, but
the stages it had still to submit never ran; `esm3 status` closes it as FAILED."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from esm3.metrics.catalog import query
from jobs.workspace import prepare
from tests.preprocess.conftest import write_config
from tests.waiting import wait_for


def _status(ws, run_id: str) -> str:
    cmd = [sys.executable, "-m", "jobs.cli", "status", run_id, "-w", str(ws), "-f", "csv"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()[1].split(",")[3]


def test_killed_local_driver_leaves_its_run_not_completed(inputs, tmp_path):
    ws = prepare(tmp_path / "ws")
    cfg = write_config(ws.parent / "t.toml", inputs)
    cmd = [sys.executable, "-m", "jobs.cli", "preprocess", "structures", "--config", str(cfg),
           "-w", str(ws), "-c", "local"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # fmt: skip
    try:
        wait_for(lambda: len(query(ws, "SELECT 1 FROM jobs WHERE stage = 'structures' "
                                   "AND state = 'COMPLETED'")), 180, "a finished structures task")  # fmt: skip
        os.kill(proc.pid, signal.SIGKILL)  # the driver only: its submitted jobs go on
        proc.wait()
        run_id = query(ws, "SELECT run_id FROM runs").run_id[0]
        ended = (
            "SELECT count(*) AS n FROM jobs WHERE run_id = ? AND state IN ('SUBMITTED', 'RUNNING')"
        )
        wait_for(lambda: _status(ws, run_id) and query(ws, ended, [run_id]).n[0] == 0, 120,
                 "the driver's jobs to end")  # fmt: skip
        assert _status(ws, run_id) != "COMPLETED"
        wait_for(lambda: _status(ws, run_id) == "FAILED", 60, f"run {run_id} closed as FAILED")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for pid in query(ws, "SELECT DISTINCT job_id FROM jobs").job_id:
            subprocess.run(["pkill", "-KILL", "-P", pid], check=False)
    stages = query(ws, "SELECT DISTINCT stage FROM jobs WHERE run_id = ?", [run_id]).stage
    assert "structure-cluster" not in set(stages)  # later stages never ran


# A structures task stopped by SIGTERM while it works on a file (the signal reaches the
# task's process while mkdssp runs) must not finish its shard without that file: before,
# the per-file `except Exception` took the handler's exception for a bad file.
_SHARD_UNDER_SIGTERM = """
import sys
from jobs.records import _watch_sigterm, raise_terminated
from esm3.data.structures.stages import StructureStageConfig, process_structure_shard

_watch_sigterm(raise_terminated)  # what every job but training does (records.Task)
out, files = sys.argv[1], sys.argv[2:]
process_structure_shard(files, out, StructureStageConfig("pdb", sasa_points=100))
"""


def _dssp_on_a_file(pid: int) -> list[int]:
    """mkdssp children of `pid` working on a structure (not the `--version` check)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            comm, rest = stat.read_text().rsplit(")", 1)
            args = (stat.parent / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if comm.endswith("(mkdssp") and int(rest.split()[1]) == pid and b"--version" not in args:
            found.append(int(stat.parent.name))
    return found


def _still_running(proc: subprocess.Popen) -> list:
    if proc.poll() is not None:
        raise AssertionError(f"the task ended early ({proc.returncode}): {proc.stderr.read()}")
    return []


def test_sigterm_during_a_structures_shard_writes_no_shard(inputs, tmp_path):
    out = tmp_path / "shard.parquet"
    files = [str(inputs[k]) for k in ("5pti", "1yjp", "4e43", "7etn")] * 3
    proc = subprocess.Popen(
        [sys.executable, "-c", _SHARD_UNDER_SIGTERM, str(out), *files],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(
            lambda: _dssp_on_a_file(proc.pid) or _still_running(proc),
            120,
            "mkdssp running on a file under the task",
            interval=0.02,
        )
        os.kill(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0 and "Terminated" in err, err[-2000:]
    assert not out.exists()  # no shard: a re-run must redo every file of it
