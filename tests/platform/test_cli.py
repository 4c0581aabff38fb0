"""The `esm3` command as a user runs it (a real subprocess)."""

import json
import subprocess
import sys

import pytest

from esm3.metrics.catalog import query
from esm3.metrics.lake import write_rows


def esm3(*args, env=None, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "jobs.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


def test_help_on_every_subcommand():
    top = esm3("--help")
    assert top.returncode == 0
    for cmd in ("slurm", "sql", "status", "demo", "bench", "dashboard"):
        assert cmd in top.stdout
        r = esm3(cmd, "--help")
        assert r.returncode == 0 and "usage: esm3 " + cmd in r.stdout


def _no_runs(ws):
    return len(query(ws, "SELECT * FROM runs")) == 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["demo", "--cluster", "nope"], "unknown cluster profile 'nope' (available: local, "),
        (
            ["demo", "shardz=3"],
            "unknown config key 'shardz' (allowed here: fasta, pipeline, preprocess, shards, train); did you mean 'shards'?",
        ),
        (["demo", "shards=four"], "config key 'shards': 'four' is not an integer"),
        (["demo", "pipeline=stats", "fasta=/no/such.fasta"], "input /no/such.fasta does not exist"),
        (["demo", "pipeline=fast"], "config key 'pipeline': 'fast' is not one of 'full', 'stats'"),
    ],
)
def test_bad_input_is_one_line_and_submits_nothing(workspace, args, message):
    r = esm3(*args, "--workspace", str(workspace))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert _no_runs(workspace)


def test_overrides_may_follow_options(workspace):
    r = esm3("demo", "--workspace", str(workspace), "-c", "local", "pipeline=stats", "shards=1")
    assert r.returncode == 0, r.stderr
    assert "20,000 sequences" in r.stdout and "COMPLETED" in r.stdout
    r = esm3("sql", "-w", str(workspace), "SELECT 1", "stray")
    assert r.returncode == 2 and "unrecognized arguments: stray" in r.stderr


def test_unwritable_workspace(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    r = esm3("demo", "--workspace", str(blocker / "ws"))
    assert r.returncode == 2
    assert (
        r.stderr.strip()
        == f"esm3 demo: error: workspace {blocker / 'ws'} is not writable: Not a directory"
    )


def test_slurm_local_with_the_cluster_down(tmp_path, workspace):
    import os

    env = {**os.environ, "ESM3_SLURM_DIR": str(tmp_path / "no-cluster")}
    r = esm3(
        "demo", "--cluster", "slurm-local", "--workspace", str(workspace), "pipeline=stats", env=env
    )
    assert r.returncode == 2
    assert "the local SLURM cluster is not running" in r.stderr and "esm3 slurm up" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert _no_runs(workspace)


def test_sql_formats_and_refusals(workspace):
    write_rows(workspace, "runs", [dict(run_id="r1", kind="demo", status="COMPLETED", nodes=2)])
    r = esm3(
        "sql", "--workspace", str(workspace), "--format", "json", "SELECT run_id, nodes FROM runs"
    )
    assert r.returncode == 0 and json.loads(r.stdout) == [{"run_id": "r1", "nodes": 2}]
    r = esm3("sql", "-w", str(workspace), "-f", "csv", "SELECT run_id, status FROM runs")
    assert r.stdout.splitlines() == ["run_id,status", "r1,COMPLETED"]
    for bad in (
        "CREATE TABLE t (a INT)",
        "INSERT INTO runs (run_id) VALUES ('x')",
        "COPY runs TO '/tmp/x.csv'",
        "ATTACH '/tmp/x.duckdb'",
    ):
        r = esm3("sql", "-w", str(workspace), bad)
        assert r.returncode == 2, bad
        assert "statements are not allowed; the catalog is read-only" in r.stderr
    r = esm3("sql", "-w", str(workspace), "SELECT nope FROM runs")
    assert r.returncode == 2 and "SQL error" in r.stderr and "nope" in r.stderr
    assert len(query(workspace, "SELECT * FROM runs")) == 1
