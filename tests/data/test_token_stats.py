"""Table S3 / S4 rows: the closed form against hand values and brute-force enumeration."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pyarrow as pa
import pytest

from esm3.data.token_stats import (
    cluster_table,
    dataset_stats_row,
    expected_unique,
    repeats_from_budget,
    rows_table,
    token_stats_row,
)
from esm3.metrics.schema import TABLES


@pytest.mark.parametrize(
    ("n", "k", "value"),
    [(1, 5, 1.0), (2, 1, 1.0), (2, 2, 1.5), (4, 3, 4 * 37 / 64), (10, 0, 0.0), (3, 1, 1.0)],
)
def test_expected_unique_hand_values(n, k, value):
    assert expected_unique(np.array([n]), k)[0] == pytest.approx(value, rel=1e-12)


def test_expected_unique_equals_enumeration():
    """Average number of distinct values over all n^k equally likely draw sequences."""
    for n, k in [(3, 2), (3, 4), (5, 3), (4, 5)]:
        seqs = itertools.product(range(n), repeat=k)
        exact = sum(len(set(s)) for s in seqs) / n**k
        assert expected_unique(np.array([n]), k)[0] == pytest.approx(exact, rel=1e-12)


def test_expected_unique_limits():
    n = np.array([1e9])
    assert expected_unique(n, 1.0)[0] == pytest.approx(1.0, rel=1e-9)  # no cancellation
    assert expected_unique(np.array([7]), 1e6)[0] == pytest.approx(7.0)
    assert expected_unique(np.array([4]), 0.5)[0] == pytest.approx(4 * (1 - 0.75**0.5))
    with pytest.raises(ValueError):
        expected_unique(np.array([0]), 1)


def test_token_stats_row_by_hand():
    n, tokens = np.array([1, 2, 4]), np.array([100, 300, 800])
    row = token_stats_row(dataset="d", type="sequence", n=n, tokens=tokens, repeats=2)
    assert row["unique_samples"] == pytest.approx(1 + 1.5 + 1.75)
    assert row["unique_tokens"] == pytest.approx(100 + 300 * 0.75 + 800 * 1.75 / 4)
    # the budget that spends k=2 draws per center: 3 centers x mean sample (100+150+200)/3
    budget = 2 * 3 * 150
    assert repeats_from_budget(budget, n, tokens) == pytest.approx(2.0)
    by_budget = token_stats_row(dataset="d", type="sequence", n=n, tokens=tokens,
                                token_budget=budget)  # fmt: skip
    assert by_budget["repeats"] == pytest.approx(2.0)
    assert by_budget["unique_tokens"] == pytest.approx(row["unique_tokens"])
    with pytest.raises(ValueError, match="exactly one"):
        token_stats_row(dataset="d", type="sequence", n=n, tokens=tokens)
    assert rows_table([row, by_budget], TABLES["token_stats"]).num_rows == 2


def test_dataset_stats_tokens_are_sequences_times_average_length():
    expanded = pa.table({"center": ["a", "a", "b", "c", "c", "c"],
                         "member": ["a", "x", "b", "c", "y", "z"]})  # fmt: skip
    lengths = {"a": 100, "x": 90, "b": 250, "c": 30, "y": 31, "z": 33, "unused": 5000}
    seqs = pa.table({"id": list(lengths), "length": list(lengths.values())})
    t = cluster_table(expanded, seqs)
    order = np.argsort(t["tokens"])
    assert sorted(t["n"].tolist()) == [1, 2, 3]
    assert t["tokens"][order].tolist() == [94, 190, 250]
    row = dataset_stats_row(dataset="uniref", type="sequence", clustering_level=0.7,
                            expansion_level=0.9, release="2023_02", **t)  # fmt: skip
    assert row["sequences"] == 6 and row["clustering_count"] == 3 and row["expansion_count"] == 6
    assert row["avg_length"] == pytest.approx(534 / 6)
    assert row["tokens"] == 534 == round(row["sequences"] * row["avg_length"])
    single = dataset_stats_row(dataset="jgi", type="sequence", clustering_level=0.7,
                               expansion_level=None, release="x", **t)  # fmt: skip
    assert single["expansion_count"] is None and single["tokens"] == 534
    assert rows_table([row, single], TABLES["dataset_stats"]).num_rows == 2
    assert math.isclose(row["avg_length"] * row["sequences"], 534)


def test_members_without_sequences_are_an_error():
    expanded = pa.table({"center": ["a"], "member": ["ghost"]})
    with pytest.raises(ValueError, match="no sequence row"):
        cluster_table(expanded, pa.table({"id": ["a"], "length": [3]}))
