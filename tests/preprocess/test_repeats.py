"""Running `esm3 preprocess` again, or twice at once, on one workspace and config: one run
at a time (the second is refused naming the holder), a stale lock taken over, the same
rows in `rejects`, `dataset_stats` and `token_stats` after a re-run as after one run, and
the scratch of killed tasks removed before the stages run again."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from esm3.metrics.catalog import query
from jobs.clusters import load_profile
from jobs.preprocess import run_preprocess
from jobs.stages.config import load_config
from jobs.stages.runner import Layout, lock_path
from jobs.workspace import prepare
from tests.preprocess.conftest import write_config
from tests.waiting import wait_for

TABLES = ("rejects", "dataset_stats", "token_stats")


def _counts(ws: Path) -> dict[str, int]:
    return {
        "rejects": int(query(ws, "SELECT count(*) AS n FROM rejects").n[0]),
        "dataset_stats": int(query(ws, "SELECT count(*) AS n FROM dataset_stats").n[0]),
        "token_stats": int(query(ws, "SELECT count(*) AS n FROM token_stats").n[0]),
    }


def _cmd(ws: Path, cfg: Path) -> list[str]:
    return [sys.executable, "-m", "jobs.cli", "preprocess", "sequences", "--config", str(cfg),
            "-w", str(ws), "-c", "local"]  # fmt: skip


@pytest.fixture(scope="module")
def first(inputs, tmp_path_factory):
    """A sequences run (process A) and a second command started while A holds the lock."""
    ws = prepare(tmp_path_factory.mktemp("repeats") / "ws")
    cfg = write_config(ws.parent / "t.toml", inputs)
    lock = lock_path(Layout.of(ws, load_config(cfg)))
    a = subprocess.Popen(_cmd(ws, cfg), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        holder = wait_for(
            lambda: lock.exists() and json.loads(lock.read_text()), 60, f"A's lock at {lock}"
        )
        b = subprocess.run(_cmd(ws, cfg), capture_output=True, text=True, timeout=120)
        a_running = a.poll() is None
        a_out, a_err = a.communicate(timeout=300)
    finally:
        if a.poll() is None:
            a.kill()
    assert a.returncode == 0, a_err
    return dict(ws=ws, cfg=cfg, lock=lock, holder=holder, b=b, a_running=a_running, a_out=a_out)


def test_second_run_is_refused_naming_the_holder_and_runs_nothing(first):
    b, holder = first["b"], first["holder"]
    assert first["a_running"], "A ended before B asked: the refusal was not exercised"
    assert b.returncode == 2, b.stdout + b.stderr
    line = b.stderr.strip()
    assert "\n" not in line and "Traceback" not in b.stderr, b.stderr
    assert "already running" in line
    for part in (f"pid {holder['pid']}", socket.gethostname(), holder["run_id"], holder["since"]):
        assert part in line, (part, line)
    # B recorded no run and no job: only A's run is there, and A's lock is gone with A
    runs = query(first["ws"], "SELECT run_id, status FROM runs")
    assert runs.to_dict("records") == [{"run_id": holder["run_id"], "status": "COMPLETED"}]
    assert not first["lock"].exists()


def test_rerun_replaces_rows_takes_a_stale_lock_and_removes_scratch(first, capsys):
    ws, cfg, lock = first["ws"], first["cfg"], first["lock"]
    once = _counts(ws)
    assert once["rejects"] >= 3 and once["dataset_stats"] == 2 and once["token_stats"] == 2
    # a lock left by a run that was killed: its pid no longer runs on this host
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    lock.write_text(json.dumps(dict(pid=gone.pid, host=socket.gethostname(),
                                    run_id="preprocess-killed", since="earlier")))  # fmt: skip
    # scratch that mmseqs tasks killed mid-way leave behind
    root = Layout.of(ws, load_config(cfg)).root
    planted = [root / "clusters" / "uniref" / "tmp" / "fasta-x" / "in.fasta",
               root / "sequences" / "uniref" / "purged" / "tmp" / "purge-y" / "db"]  # fmt: skip
    for p in planted:
        p.parent.mkdir(parents=True)
        p.write_bytes(os.urandom(1 << 20))

    res = run_preprocess(ws, load_profile("local"), cfg, "sequences", progress=False)
    err = capsys.readouterr().err
    assert "took over the lock" in err and "preprocess-killed" in err, err
    assert all(not p.exists() and not p.parent.exists() for p in planted)
    assert "removed scratch" in err and "clusters/uniref/tmp" in err, err
    assert not lock.exists()

    assert _counts(ws) == once  # replaced, not appended
    for table in TABLES:  # every row now comes from the re-run
        ids = query(ws, f"SELECT DISTINCT run_id FROM {table}").run_id.tolist()  # noqa: S608 - fixed names
        assert ids == [res.run_id], table
    # every write is kept underneath; the views show one per output
    assert int(query(ws, "SELECT count(*) AS n FROM rejects_all").n[0]) == 2 * once["rejects"]
