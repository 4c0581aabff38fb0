"""SQL that cannot be injected, user queries that cannot take the machine down, and read-only
commands that answer on a damaged, full or read-only workspace."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from esm3.metrics import reader
from esm3.metrics.catalog import CATALOG_FILE, query, refresh_catalog_file
from esm3.metrics.lake import write_rows

# a cross join sorted at random: unbounded, it grows until the machine runs out of memory
RUNAWAY = (
    "SELECT a.range AS x, b.range AS y FROM range(1000000) a, range(100000) b ORDER BY random()"
)
HOSTILE_IDS = [
    "x' OR 1=1 --",
    "x'",
    "x' UNION SELECT run_id, kind, name, status, cluster, slurm_job_id, nodes, world_size, "
    "submitted_at, finished_at FROM runs --",
]


def esm3(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "jobs.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        cwd=Path(__file__).resolve().parents[2],
    )


@pytest.fixture
def two_runs(workspace: Path) -> Path:
    write_rows(workspace, "runs", [dict(run_id="secret-a", kind="demo", status="COMPLETED")])
    write_rows(workspace, "runs", [dict(run_id="secret-b", kind="demo", status="FAILED")])
    return workspace


def _one_line_error(r: subprocess.CompletedProcess) -> None:
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "secret-" not in r.stdout  # never another run's rows


@pytest.mark.parametrize("run_id", HOSTILE_IDS, ids=["or-true", "quote", "union"])
def test_status_with_a_hostile_run_id_names_no_other_run(two_runs, run_id):
    r = esm3("status", run_id, "-w", str(two_runs))
    _one_line_error(r)
    assert "no run" in r.stderr


def test_status_with_a_negative_limit_is_a_one_line_error(two_runs):
    _one_line_error(esm3("status", "--limit", "-1", "-w", str(two_runs)))
    ok = esm3("status", "--limit", "1", "-w", str(two_runs))
    assert ok.returncode == 0 and ok.stdout.count("secret-") == 1, ok.stderr


def test_values_are_bound_never_pasted(two_runs):
    for hostile in HOSTILE_IDS:
        assert query(two_runs, "SELECT * FROM runs WHERE run_id = ?", [hostile]).empty
    assert len(query(two_runs, "SELECT * FROM runs WHERE run_id = $id", {"id": "secret-a"})) == 1


def test_runaway_query_is_stopped_by_the_timeout(two_runs):
    # 1e13 products summed: constant memory and far more than 3 s of work on any machine, so
    # only the watchdog can end it (the subprocess timeout bounds the whole command)
    long = "SELECT sum(a.range * b.range) FROM range(10000000) a, range(1000000) b"
    r = esm3("sql", long, "-w", str(two_runs), "--timeout", "3", "--memory", "300MB", timeout=60)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "query stopped after 3 s" in r.stderr and "Traceback" not in r.stderr


def test_spill_limit_stops_a_query_with_a_clear_message(two_runs):
    limits = reader.Limits(memory="64MB", temp="16MB", timeout_s=60)
    with reader.LakeReader(two_runs) as r, pytest.raises(reader.SqlStopped, match="memory limit"):
        r.user_sql(RUNAWAY, limits)


def test_rows_are_fetched_up_to_the_cap(two_runs):
    with reader.LakeReader(two_runs) as r:
        df, cut = r.user_sql("SELECT * FROM range(1000000000000)", reader.Limits(max_rows=7))
    assert len(df) == 7 and cut  # streamed: a trillion rows never materialise


def test_limits_come_from_flags_then_environment_then_defaults():
    env = {"ESM3_SQL_TIMEOUT_S": "9", "ESM3_SQL_MEMORY": "2GB"}
    got = reader.Limits.from_env(env, memory="512MB")
    assert (got.timeout_s, got.memory, got.threads) == (9.0, "512MB", 2)
    with pytest.raises(reader.SqlRefused, match="positive"):
        reader.Limits.from_env({}, timeout_s=-1)


def _corrupt(workspace: Path) -> Path:
    bad = write_rows(workspace, "runs", [dict(run_id=f"r{i}", kind="demo") for i in range(20)])
    raw = bad.read_bytes()
    bad.write_bytes(raw[: len(raw) // 2])
    return bad


def _leftovers(workspace: Path) -> list[str]:
    return [p.name for p in workspace.iterdir() if p.name.endswith((".tmp", ".wal"))]


def test_catalog_rebuild_skips_a_corrupt_file_and_leaves_nothing(two_runs):
    _corrupt(two_runs)
    (two_runs / CATALOG_FILE).unlink()
    for args in (("sql", "SELECT count(*) AS n FROM runs"), ("status",)):
        r = esm3(*args, "-w", str(two_runs))
        assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
        assert "skipped corrupt lake file" in r.stderr or args[0] == "status"
    assert (two_runs / CATALOG_FILE).exists() and not _leftovers(two_runs)
    # the file holds the views without the corrupt file, for any DuckDB client
    import duckdb

    con = duckdb.connect(str(refresh_catalog_file(two_runs)), read_only=True)
    assert con.execute("SELECT count(*) FROM runs").fetchone()[0] == 2
    con.close()


def test_a_failed_rebuild_leaves_no_temporary_file(two_runs, monkeypatch):
    def fail(self, con, literal=False):
        raise OSError("disk full")

    monkeypatch.setattr(reader.LakeReader, "bind_views", fail)
    with pytest.raises(OSError, match="disk full"):
        refresh_catalog_file(two_runs)
    assert not _leftovers(two_runs)


@pytest.fixture
def full_workspace(two_runs, tmp_path):
    """A copy of the workspace on a full filesystem (a 2 MB tmpfs filled up), or, when
    mounting is not allowed, a copy made read-only."""
    where = tmp_path / "small"
    where.mkdir()
    mounted = os.geteuid() == 0 and shutil.which("mount") is not None
    if mounted:
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(where)], capture_output=True
        ).returncode == 0  # fmt: skip
    ws = where / "ws"
    shutil.copytree(two_runs, ws)
    (ws / CATALOG_FILE).unlink()
    if mounted:
        with open(where / "filler", "wb") as f:  # fill it: every write fails with ENOSPC
            try:
                while True:
                    f.write(b"\0" * 65536)
            except OSError:
                pass
    else:
        for p in [ws, *ws.rglob("*")]:
            p.chmod(0o555 if p.is_dir() else 0o444)
    try:
        yield ws
    finally:
        if mounted:
            subprocess.run(["umount", str(where)], check=False)
        else:
            for p in [ws, *ws.rglob("*")]:
                p.chmod(0o755 if p.is_dir() else 0o644)


def test_read_only_commands_answer_on_a_full_or_read_only_workspace(full_workspace):
    before = sorted(p.name for p in full_workspace.iterdir())
    r = esm3("sql", "SELECT run_id FROM runs ORDER BY run_id", "-w", str(full_workspace))
    assert r.returncode == 0 and r.stdout.split()[-2:] == ["secret-a", "secret-b"], r.stderr
    r = esm3("status", "-w", str(full_workspace))
    assert r.returncode == 0 and "secret-a" in r.stdout and "secret-b" in r.stdout, r.stderr
    assert sorted(p.name for p in full_workspace.iterdir()) == before  # nothing left behind
