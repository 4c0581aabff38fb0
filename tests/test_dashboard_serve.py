"""`esm3 dashboard` as a real process: stopping it (SIGTERM, SIGINT) stops Streamlit too,
so nothing is left serving on the port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.waiting import wait_for

pytest.importorskip("streamlit")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children(pid: int) -> list[int]:
    """Processes whose parent is `pid` (from /proc: field 4 of stat is the parent)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # a process that ended while we looked
            continue
        if int(text.rsplit(")", 1)[1].split()[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def healthy(port: int) -> bool:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as r:
        return r.read() == b"ok"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stopped_dashboard_leaves_nothing_serving(tmp_path, sig):
    port = free_port()
    log = tmp_path / "dashboard.log"
    cmd = [sys.executable, "-m", "jobs.cli", "dashboard", "-w", str(tmp_path / "ws")]
    with open(log, "wb") as out:
        proc = subprocess.Popen([*cmd, "--port", str(port)], stdout=out, stderr=out)
    started: list[int] = []
    try:

        def up() -> bool:
            assert proc.poll() is None, f"esm3 dashboard exited: {log.read_text()[-2000:]}"
            return healthy(port)

        wait_for(up, 120, f"the dashboard's health endpoint on port {port}", ignore=(OSError,))
        started = wait_for(lambda: children(proc.pid), 10, "the streamlit child process")
        proc.send_signal(sig)
        wait_for(lambda: proc.poll() is not None, 30, "esm3 dashboard to exit")
        wait_for(lambda: not any(alive(p) for p in started), 30, "the streamlit child to end")
        wait_for(lambda: not listening(port), 30, f"nothing listening on port {port}")
        assert proc.returncode == 0, log.read_text()[-2000:]
    finally:
        for pid in [proc.pid, *started]:  # only what this test started
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=30)
