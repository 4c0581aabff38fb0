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
    linclust,
    linclust_args,
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


def test_clusters_equal_mmseqs_run_directly(sample, tmp_path):
    shard, fasta = sample
    summary, rejects = cluster_shards([shard], tmp_path / "c70.parquet", 0.7, tmp_path / "w")
    ours = pq.read_table(tmp_path / "c70.parquet")
    assert ours.schema.equals(CLUSTER_SCHEMA) and rejects == []
    # the reference: mmseqs itself, with the paper's flags typed out
    subprocess.run(
        ["mmseqs", "easy-linclust", fasta, tmp_path / "ref", tmp_path / "reftmp",
         "--kmer-per-seq", "100", "--cluster-mode", "2", "--cov-mode", "1", "-c", "0.8",
         "--min-seq-id", "0.7", "--threads", "1"],
        check=True, capture_output=True,
    )  # fmt: skip
    with open(tmp_path / "ref_cluster.tsv") as f:
        ref = {tuple(row) for row in csv.reader(f, delimiter="\t")}
    got = set(zip(ours["representative"].to_pylist(), ours["member"].to_pylist(), strict=True))
    assert got == ref
    assert len(got) == 2000 and summary["clusters"] == len({r for r, _ in ref}) < 2000
    assert set(ours["level"].to_pylist()) == {0.7}
    again, _ = cluster_shards([shard], tmp_path / "c70.parquet", 0.7, tmp_path / "w")
    assert again["skipped"] and again["clusters"] == summary["clusters"]


# easy-search (slow: ~30 s of fixed cost per call here) is tested once, in test_purge.py


def test_mmseqs_missing_is_a_clear_error(sample, tmp_path, monkeypatch):
    shard, fasta = sample
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH without mmseqs
    with pytest.raises(ToolError, match="mmseqs: not found on PATH"):
        cluster_shards([shard], tmp_path / "out.parquet", 0.7, tmp_path / "w")
    assert not (tmp_path / "out.parquet").exists()
    with pytest.raises(ToolError, match="not found"):
        search(fasta, fasta, tmp_path)


def test_mmseqs_failure_carries_its_stderr(tmp_path):
    with pytest.raises(ToolError, match="failed with exit code") as err:
        linclust(tmp_path / "missing.fasta", 0.7, tmp_path)
    assert "missing.fasta" in str(err.value)
    assert [p for p in tmp_path.iterdir()] == []  # temporary folders removed
