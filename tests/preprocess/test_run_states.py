"""A preprocessing run whose driver is killed is never COMPLETED: its jobs finish, but
the stages it had still to submit never ran; `esm3 status` closes it as FAILED."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

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
