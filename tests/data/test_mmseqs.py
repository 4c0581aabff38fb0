"""mmseqs2 wrappers: the paper's exact flags, equality with mmseqs run directly, failures."""

from __future__ import annotations

import csv
import shutil
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from esm3.data.fasta import ingest_fasta, write_fasta
from esm3.data.mmseqs import (
    CLUSTER_SCHEMA,
    cluster_shards,
    createdb,
    linclust_args,
    linclust_db,
    search,
)
from esm3.tool import ToolError
from tests.realdata import uniprot_fasta

pytestmark = pytest.mark.skipif(shutil.which("mmseqs") is None, reason="mmseqs2 not installed")


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> tuple[Path, Path]:
    """2,000 real UniProt sequences as a Parquet shard and as FASTA."""
    tmp = tmp_path_factory.mktemp("mmseqs")
    ingest_fasta(uniprot_fasta(), tmp / "all.parquet", dataset="uniprot")
    shard = tmp / "sample.parquet"
    pq.write_table(pq.read_table(tmp / "all.parquet").slice(0, 2000), shard)
    return shard, write_fasta(pq.read_table(shard), tmp / "sample.fasta")


def test_paper_flags_exactly():
    assert linclust_args(0.7) == [
        "--kmer-per-seq", "100", "--cluster-mode", "2", "--cov-mode", "1", "-c", "0.8",
        "--min-seq-id", "0.7",
    ]  # fmt: skip
    with pytest.raises(ValueError, match="fraction"):
        linclust_args(70)


def _bare_easy_linclust(fasta: Path, level: float, tmp: Path) -> list[tuple[str, str]]:
    """The reference: mmseqs itself, with the paper's flags typed out; rows in file order."""
    prefix = tmp / f"ref{level}"
    subprocess.run(
        ["mmseqs", "easy-linclust", fasta, prefix, tmp / f"reftmp{level}",
         "--kmer-per-seq", "100", "--cluster-mode", "2", "--cov-mode", "1", "-c", "0.8",
         "--min-seq-id", str(level), "--threads", "1"],
        check=True, capture_output=True,
    )  # fmt: skip
    with open(f"{prefix}_cluster.tsv") as f:
        return [tuple(row) for row in csv.reader(f, delimiter="\t")]


def _rows(path: Path) -> list[tuple[str, str]]:
    t = pq.read_table(path)
    return list(zip(t["representative"].to_pylist(), t["member"].to_pylist(), strict=True))


@pytest.fixture(scope="module")
def bare(sample, tmp_path_factory) -> dict[float, list[tuple[str, str]]]:
    tmp = tmp_path_factory.mktemp("bare")
    return {lv: _bare_easy_linclust(sample[1], lv, tmp) for lv in (0.7, 0.9)}


def test_streamed_clusters_equal_bare_easy_linclust_at_both_levels(sample, bare, tmp_path):
    shard, _ = sample
    # two shards, streamed in batches of 300 rows: what one createdb of a dataset sees
    table = pq.read_table(shard)
    halves = [tmp_path / "a.parquet", tmp_path / "b.parquet"]
    pq.write_table(table.slice(0, 1100), halves[0])
    pq.write_table(table.slice(1100), halves[1])
    outs = {0.7: tmp_path / "c70.parquet", 0.9: tmp_path / "c90.parquet"}
    summaries = cluster_shards(halves, outs, tmp_path / "w", batch_rows=300)
    for (level, out), summary in zip(outs.items(), summaries, strict=True):
        ours = pq.read_table(out)
        assert ours.schema.equals(CLUSTER_SCHEMA)
        assert _rows(out) == bare[level]  # same pairs, same order
        assert set(ours["level"].to_pylist()) == {level}
        assert summary["clusters"] == len({r for r, _ in bare[level]}) < 2000
        assert summary["sequences"] == 2000 and not summary["skipped"]
    assert summaries[0]["clusters"] < summaries[1]["clusters"]  # 70% merges more than 90%
    assert list((tmp_path / "w").iterdir()) == []  # database and TSVs removed
    again = cluster_shards(halves, outs, tmp_path / "w")
    assert [a["skipped"] for a in again] == [True, True]
    assert [a["clusters"] for a in again] == [s["clusters"] for s in summaries]


def test_mpi_runner_runs_the_parallel_steps(sample, bare, tmp_path):
    """mmseqs' RUNNER, as a site's `mpirun -np N` would be: a wrapper that records what it
    was given, drops its own option and runs the command."""
    log = tmp_path / "runner.log"
    wrapper = tmp_path / "mpirun"
    wrapper.write_text(f'#!/bin/sh\necho "$@" >> {log}\n'
                       'if [ "$1" = "-np" ]; then shift 2; fi\nexec "$@"\n')  # fmt: skip
    wrapper.chmod(0o755)
    out = tmp_path / "c70.parquet"
    cluster_shards([sample[0]], {0.7: out}, tmp_path / "w", runner=f"{wrapper} -np 2")
    calls = log.read_text().splitlines()
    assert calls and all(c.startswith("-np 2 ") for c in calls)
    steps = {c.split()[3] for c in calls}  # -np 2 <mmseqs> <module> ...
    assert {"kmermatcher", "rescorediagonal"} <= steps
    assert _rows(out) == bare[0.7]


def test_cluster_task_uses_the_profiles_scratch_and_runner(sample, bare, tmp_path, monkeypatch):
    from jobs.clusters import MMSEQS_RUNNER_ENV, SCRATCH_ENV
    from jobs.stages.sequences import cluster_task

    log = tmp_path / "runner.log"
    wrapper = tmp_path / "runner"
    wrapper.write_text(f'#!/bin/sh\necho "$@" >> {log}\nexec "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv(SCRATCH_ENV, str(tmp_path / "node-local"))
    monkeypatch.setenv(MMSEQS_RUNNER_ENV, str(wrapper))
    monkeypatch.setenv("ESM3_JOB_CPUS", "1")
    outs = [str(tmp_path / "out" / "c70.parquet"), str(tmp_path / "out" / "c90.parquet")]
    result = cluster_task("ws", "run", [str(sample[0])], outs, [0.7, 0.9])
    assert [s["level"] for s in result["levels"]] == [0.7, 0.9]
    assert _rows(Path(outs[0])) == bare[0.7] and _rows(Path(outs[1])) == bare[0.9]
    databases = {c.split()[2] for c in log.read_text().splitlines() if " kmermatcher " in c}
    assert len(databases) == 1  # one database for both levels, in the node-local scratch
    assert databases.pop().startswith(str(tmp_path / "node-local" / "esm3-mmseqs" / "linclust-"))
    assert not (tmp_path / "out" / "tmp").exists()


# easy-search (slow: ~30 s of fixed cost per call here) is tested once, in test_purge.py


def test_mmseqs_missing_is_a_clear_error(sample, tmp_path, monkeypatch):
    shard, fasta = sample
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH without mmseqs
    with pytest.raises(ToolError, match="mmseqs: not found on PATH"):
        cluster_shards([shard], {0.7: tmp_path / "out.parquet"}, tmp_path / "w")
    assert not (tmp_path / "out.parquet").exists()
    with pytest.raises(ToolError, match="not found"):
        search(fasta, fasta, tmp_path)


def test_mmseqs_failure_carries_its_stderr(sample, tmp_path):
    with pytest.raises(ToolError, match="failed with exit code") as err:
        linclust_db(tmp_path / "missing", 0.7, tmp_path / "work")
    assert "missing" in str(err.value)
    with pytest.raises(ToolError, match="createdb stdin") as err:  # a streamed input's failure
        createdb([sample[0]], tmp_path / "no" / "such" / "dir" / "db")
    assert "Cannot open" in str(err.value) and "db.source" in str(err.value)  # its stderr


def test_a_failing_level_leaves_no_output_and_no_scratch(sample, tmp_path):
    outs = {0.7: tmp_path / "c70.parquet"}
    with pytest.raises(ToolError, match="failed with exit code"):
        cluster_shards([sample[0]], outs, tmp_path / "w", runner="false")
    assert not outs[0.7].exists() and list((tmp_path / "w").iterdir()) == []
