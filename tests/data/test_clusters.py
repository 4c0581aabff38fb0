"""Cluster expansion: a hand-worked example, invariants on real mmseqs clusters, the cap."""

from __future__ import annotations

import shutil

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from esm3.data.clusters import EXPANDED_SCHEMA, expand_cluster_files, expand_clusters
from esm3.data.fasta import ingest_fasta
from esm3.data.mmseqs import cluster_shards
from tests.realdata import uniprot_fasta


def _clusters(pairs: dict[str, list[str]]) -> pa.Table:
    reps = [r for r, ms in pairs.items() for _ in ms]
    members = [m for ms in pairs.values() for m in ms]
    return pa.table({"representative": reps, "member": members})


def _pairs(table: pa.Table) -> set[tuple[str, str]]:
    return set(zip(table["center"].to_pylist(), table["member"].to_pylist(), strict=True))


def test_hand_worked_example():
    low = _clusters({"A": ["A", "B", "C", "D"], "E": ["E", "F"], "G": ["G"]})
    high = _clusters({"A": ["A", "B"], "C": ["C"], "D": ["D", "E", "F"], "G": ["G"]})
    table, stats = expand_clusters(low, high)
    # B, E, F are high-level members but not representatives: removed; E's cluster empties
    assert _pairs(table) == {("A", "A"), ("A", "C"), ("A", "D"), ("G", "G")}
    assert table.schema.equals(EXPANDED_SCHEMA)
    assert stats["removed_members"] == 3 and stats["dropped_empty_centers"] == 1
    assert stats["centers"] == 2 and stats["members"] == 4 and stats["dropped_by_cap"] == 0
    assert stats["low_clusters"] == 3 and stats["high_clusters"] == 4


def test_cap_is_deterministic_seeded_and_order_free():
    members = [f"m{i:03d}" for i in range(100)]
    low = _clusters({"c": members, "d": ["d"]})
    a, stats = expand_clusters(low, None, cap=20, seed=1)
    shuffled = low.take(pa.array(np.random.default_rng(0).permutation(low.num_rows)))
    b, _ = expand_clusters(shuffled, None, cap=20, seed=1)
    c, _ = expand_clusters(low, None, cap=20, seed=2)
    assert a.equals(b)
    assert _pairs(a) != _pairs(c)
    assert sum(1 for x in a["center"].to_pylist() if x == "c") == 20
    assert stats["dropped_by_cap"] == 80 and stats["capped_clusters"] == 1
    assert stats["high_clusters"] is None  # single-level dataset (JGI, OAS): no expansion


@pytest.fixture(scope="module")
def real_levels(tmp_path_factory):
    """2,000 real UniProt sequences clustered by mmseqs at 70% and 90%."""
    if shutil.which("mmseqs") is None:
        pytest.skip("mmseqs2 not installed")
    tmp = tmp_path_factory.mktemp("clusters")
    ingest_fasta(uniprot_fasta(), tmp / "all.parquet", dataset="uniprot")
    pq.write_table(pq.read_table(tmp / "all.parquet").slice(0, 2000), tmp / "s.parquet")
    outs = {level: tmp / f"c{level}.parquet" for level in (0.7, 0.9)}
    cluster_shards([tmp / "s.parquet"], outs, tmp / "w")
    return tmp / "c0.7.parquet", tmp / "c0.9.parquet"


@pytest.mark.parametrize("cap", [20, 2])
def test_invariants_on_real_clusters(real_levels, cap):
    low_path, high_path = real_levels
    table, s = expand_clusters(low_path, high_path, cap=cap, seed=7)
    low, high = pq.read_table(low_path), pq.read_table(high_path)
    con = duckdb.connect()
    con.register("e", table)
    con.register("low", low)
    con.register("high", high)

    def one(sql: str, params: list | None = None) -> int:
        return con.execute(sql, params).fetchall()[0][0]

    # every member lies in its center's low-level cluster, and is a high-level representative
    assert one("SELECT count(*) FROM e ANTI JOIN low ON e.center = low.representative "
               "AND e.member = low.member") == 0  # fmt: skip
    assert one("SELECT count(*) FROM e ANTI JOIN (SELECT DISTINCT representative FROM high) h "
               "ON e.member = h.representative") == 0  # fmt: skip
    assert one("SELECT count(*) FROM (SELECT center FROM e GROUP BY center "
               "HAVING count(*) > ?)", [cap]) == 0  # fmt: skip
    assert one("SELECT count(*) - count(DISTINCT member) FROM e") == 0
    # a high-level representative is dropped only by the cap: before it, all are present
    n_high_reps = len(set(high["representative"].to_pylist()))
    assert s["members_before_cap"] == n_high_reps == s["high_clusters"]
    # counts add up
    assert (
        s["members"]
        == table.num_rows
        == s["low_members"] - s["removed_members"] - s["dropped_by_cap"]
    )
    assert s["centers"] == len(set(table["center"].to_pylist()))
    assert s["centers"] == s["low_clusters"] - s["dropped_empty_centers"]
    assert s["low_members"] == s["high_members"] == 2000
    if cap == 2:
        assert s["dropped_by_cap"] > 0 and s["capped_clusters"] > 0


def test_file_task_matches_and_is_idempotent(real_levels, tmp_path):
    low_path, high_path = real_levels
    table, stats = expand_clusters(low_path, high_path, seed=3)
    out = tmp_path / "expanded.parquet"
    first, rejects = expand_cluster_files(low_path, high_path, out, seed=3, temp_dir=tmp_path)
    assert pq.read_table(out).cast(EXPANDED_SCHEMA).equals(table) and rejects == []
    assert {k: first[k] for k in stats} == stats
    second, _ = expand_cluster_files(low_path, high_path, out, seed=3)
    assert second["skipped"] and second["members"] == stats["members"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["expanded.parquet"]
