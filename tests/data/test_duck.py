"""Every DuckDB connection a preprocessing stage opens runs under the configured limits."""

from __future__ import annotations

import re
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from esm3.data import duck
from esm3.data.clusters import expand_clusters
from esm3.data.interpro import (
    IPR_SCHEMA,
    frequent_labels,
    ingest_protein2ipr,
    interpro_vocabulary,
    load_annotations,
)
from esm3.data.purge import select_validation
from esm3.data.structures.filters import read_esmatlas_metadata
from esm3.data.structures.stages import structure_dataset_stats
from esm3.data.token_stats import cluster_table

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def opened(monkeypatch):
    """(memory_limit, temp_directory) of every connection opened, read right after opening."""
    seen: list[tuple[str, str]] = []
    real = duckdb.connect

    def recording(*args, **kwargs):
        con = real(*args, **kwargs)
        seen.append(
            con.sql(
                "SELECT current_setting('memory_limit'), current_setting('temp_directory')"
            ).fetchall()[0]
        )
        return con

    monkeypatch.setattr(duckdb, "connect", recording)
    return seen


def test_stage_functions_connect_under_the_configured_limits(tmp_path, opened):
    reference = duckdb.connect(config={"memory_limit": "300MB"})
    expected_limit = reference.sql("SELECT current_setting('memory_limit')").fetchall()[0][0]
    reference.close()
    opened.clear()
    spill = tmp_path / "spill"
    (tmp_path / "p2ipr.tsv").write_text(  # unsorted: sorted input needs no sort
        "P2\tIPR000002\tn\tPF2\t2\t3\nP1\tIPR000001\tname\tPF1\t1\t5\n"
    )
    seqs = pa.table({"id": ["P1", "P2"], "dataset": ["d", "d"], "sequence": ["ACDEF", "GH"]})
    pq.write_table(seqs, tmp_path / "chains.parquet")
    clusters = pa.table({"representative": ["P1", "P1"], "member": ["P1", "P2"]})
    (tmp_path / "meta.csv").write_text("id,plddt,ptm\nP1,80,0.7\nP2,90,0.8\n")
    with duck.limits("300MB", 1, spill):
        ingest_protein2ipr(tmp_path / "p2ipr.tsv", tmp_path / "ipr.parquet")
        ipr = [tmp_path / "ipr.parquet"]
        calls = [
            lambda: select_validation(seqs, n=1),
            lambda: expand_clusters(clusters),
            lambda: cluster_table(clusters.rename_columns(["center", "member"]), seqs),
            lambda: frequent_labels(ipr, "ipr", IPR_SCHEMA, 1),
            lambda: interpro_vocabulary(ipr),
            lambda: load_annotations(ipr, ["P1"]),
            lambda: read_esmatlas_metadata(tmp_path / "meta.csv", ["P2"]),
            lambda: structure_dataset_stats(
                [tmp_path / "chains.parquet"], "d", "r", clusters=clusters
            ),
        ]
        for call in calls:
            before = len(opened)
            call()
            assert len(opened) > before  # each one opens a connection of its own
    assert len(opened) >= len(calls) + 1
    assert set(opened) == {(expected_limit, str(spill))}


def test_nothing_else_opens_duckdb_directly():
    # the metrics catalog (esm3.metrics) is not preprocessing and keeps its own connections
    allowed = {ROOT / "esm3/data/duck.py"}
    direct = [
        p
        for folder in ("esm3", "jobs")
        for p in (ROOT / folder).rglob("*.py")
        if p not in allowed
        and "metrics" not in p.parts
        and re.search(r"duckdb\.connect\(", p.read_text())
    ]
    assert direct == []
