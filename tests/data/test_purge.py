"""Validation purge on real sequences with planted near-copies of validation sequences."""

from __future__ import annotations

import csv
import shutil
import subprocess

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from esm3.data.fasta import ALPHABET, ingest_fasta, write_fasta
from esm3.data.purge import BLACKLIST_SCHEMA, purge_shard, select_validation, write_validation
from tests.realdata import uniprot_fasta


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("purge")
    ingest_fasta(uniprot_fasta(), tmp / "all.parquet", dataset="uniref")
    return pq.read_table(tmp / "all.parquet")


def test_validation_sampling_is_deterministic_and_order_free(real):
    two = pa.concat_tables(
        [
            real.slice(0, 600),
            real.slice(600, 400).set_column(1, "dataset", pa.array(["mgnify"] * 400)),
        ]
    )
    a = select_validation(two, n=50, seed=1)
    shuffled = two.take(pa.array(np.random.default_rng(0).permutation(two.num_rows)))
    b = select_validation(shuffled, n=50, seed=1)
    c = select_validation(two, n=50, seed=2)
    assert a.equals(b)
    assert a["id"].to_pylist() != c["id"].to_pylist()
    counts = pc.value_counts(a["dataset"]).to_pylist()
    assert {x["values"]: x["counts"] for x in counts} == {"uniref": 50, "mgnify": 50}
    assert select_validation(two.slice(0, 30), n=50).num_rows == 30  # fewer than n: all


def _mutate(seq: str, fraction: float, rng: np.random.Generator) -> str:
    s = np.array(list(seq))
    pos = rng.choice(len(s), size=max(1, int(fraction * len(s))), replace=False)
    for p in pos:
        s[p] = rng.choice([a for a in ALPHABET[:20] if a != s[p]])
    return "".join(s)


@pytest.mark.skipif(shutil.which("mmseqs") is None, reason="mmseqs2 not installed")
def test_purge_removes_exactly_the_hits_at_70_percent(real, tmp_path):
    rng = np.random.default_rng(0)
    base = real.slice(0, 300).select(["id", "dataset", "sequence", "length"])
    write_validation([_save(base, tmp_path / "base.parquet")], tmp_path / "valid.parquet", n=40)
    valid = pq.read_table(tmp_path / "valid.parquet")
    # plant near-copies of validation sequences in training: 3% mutated (kept identity ~97%)
    # and 45% mutated (identity ~55%, below the threshold)
    near = [
        (f"near_{i}", _mutate(s, 0.03, rng))
        for i, s in zip(valid["id"].to_pylist()[:8], valid["sequence"].to_pylist()[:8], strict=True)
    ]
    far = [
        (f"far_{i}", _mutate(s, 0.45, rng))
        for i, s in zip(
            valid["id"].to_pylist()[8:14], valid["sequence"].to_pylist()[8:14], strict=True
        )
    ]
    planted = pa.table({
        "id": [i for i, _ in near + far], "dataset": ["uniref"] * len(near + far),
        "sequence": [s for _, s in near + far], "length": [len(s) for _, s in near + far],
    }).cast(base.schema)  # fmt: skip
    train = _save(pa.concat_tables([base, planted]), tmp_path / "train.parquet")

    summary, rejects = purge_shard(
        train, tmp_path / "valid.parquet", tmp_path / "out.parquet", tmp_path / "black.parquet",
        tmp_path / "work",
    )  # fmt: skip
    black = pq.read_table(tmp_path / "black.parquet")
    kept = pq.read_table(tmp_path / "out.parquet")
    assert black.schema.equals(BLACKLIST_SCHEMA)

    # reference: mmseqs easy-search run directly with the paper's flags, training vs validation
    valid_ids = set(valid["id"].to_pylist())
    training = pq.read_table(train)
    training = training.filter(pc.invert(pc.is_in(training["id"], pa.array(list(valid_ids)))))
    write_fasta(training, tmp_path / "q.fasta")
    write_fasta(valid, tmp_path / "t.fasta")
    subprocess.run(
        ["mmseqs", "easy-search", tmp_path / "q.fasta", tmp_path / "t.fasta", tmp_path / "r.m8",
         tmp_path / "rtmp", "--alignment-mode", "3", "-c", "0.8", "--cov-mode", "0",
         "--max-seqs", "300", "--max-accept", "3", "--start-sens", "2", "-s", "7",
         "--sens-steps", "3", "--threads", "1"],
        check=True, capture_output=True,
    )  # fmt: skip
    with open(tmp_path / "r.m8") as f:
        ref_hits = [(r[0], r[1], float(r[2])) for r in csv.reader(f, delimiter="\t")]
    assert all(0.0 <= fid <= 1.0 for _, _, fid in ref_hits)  # a fraction, not percent
    expected = {q for q, _, fid in ref_hits if fid >= 0.70}

    blacklisted = set(black["query"].to_pylist())
    assert blacklisted == expected
    assert {i for i, _ in near} <= blacklisted  # the planted near-copies are caught
    assert not {i for i, _ in far} & blacklisted  # the distant ones are not
    assert set(kept["id"].to_pylist()) == set(training["id"].to_pylist()) - expected
    assert not set(kept["id"].to_pylist()) & valid_ids
    assert pc.min(black["fident"]).as_py() >= 0.70
    assert {r["record"] for r in rejects} == expected
    assert all(r["reason"] == "validation_hit" and r["stage"] == "purge" for r in rejects)
    u = summary["by_dataset"]["uniref"]
    assert u["input"] == 314 and u["validation_removed"] == 40
    assert u["blacklisted"] == len(expected) and u["kept"] == 314 - 40 - len(expected)

    again, rejects2 = purge_shard(
        train, tmp_path / "valid.parquet", tmp_path / "out.parquet", tmp_path / "black.parquet",
        tmp_path / "work",
    )  # fmt: skip
    assert again["skipped"] and again["blacklisted"] == summary["blacklisted"]
    assert rejects2 == rejects


def _save(table: pa.Table, path):
    pq.write_table(table, path)
    return path
