"""Two-level sampler: determinism from (seed, step, rank), resume, and the sampling law."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from esm3.data.sampler import ClusterIndex, TwoLevelSampler


def _index(sizes: list[int], prefix: str) -> ClusterIndex:
    centers = [f"{prefix}c{i}" for i, n in enumerate(sizes) for _ in range(n)]
    members = [f"{prefix}c{i}_m{j}" for i, n in enumerate(sizes) for j in range(n)]
    return ClusterIndex.from_table(pa.table({"center": centers, "member": members}))


@pytest.fixture
def datasets() -> dict[str, ClusterIndex]:
    # one center of 20 members among 9 singletons, and a second dataset of pairs
    return {"uniref": _index([20] + [1] * 9, "u"), "mgnify": _index([2] * 50, "g")}


def _same(a, b) -> bool:
    return all(
        np.array_equal(x, y)
        for x, y in zip(
            (a.dataset, a.center, a.member), (b.dataset, b.center, b.member), strict=True
        )
    )


def test_deterministic_in_seed_step_rank(datasets):
    w = {"uniref": 0.7, "mgnify": 0.3}
    a = TwoLevelSampler(datasets, w, seed=5, rank=0)
    b = TwoLevelSampler(datasets, w, seed=5, rank=0)
    assert _same(a.sample(1000), b.sample(1000)) and _same(a.sample(7), b.sample_at(1, 7))
    other_rank = TwoLevelSampler(datasets, w, seed=5, rank=1)
    other_seed = TwoLevelSampler(datasets, w, seed=6, rank=0)
    assert not _same(a.sample_at(0, 1000), other_rank.sample_at(0, 1000))
    assert not _same(a.sample_at(0, 1000), other_seed.sample_at(0, 1000))
    assert not _same(a.sample_at(0, 1000), a.sample_at(1, 1000))


def test_resume_from_state_continues_the_same_stream(datasets):
    w = {"uniref": 1, "mgnify": 1}
    run = TwoLevelSampler(datasets, w, seed=3, rank=2)
    for _ in range(5):
        run.sample(64)
    state = run.state_dict()
    expected = [run.sample(64) for _ in range(3)]
    resumed = TwoLevelSampler(datasets, w, seed=0, rank=0)
    resumed.load_state_dict(state)
    assert all(_same(e, resumed.sample(64)) for e in expected)
    assert resumed.state_dict() == run.state_dict()


def test_state_from_different_data_is_refused(datasets):
    s = TwoLevelSampler(datasets, {"uniref": 1, "mgnify": 1})
    other = TwoLevelSampler({"uniref": datasets["uniref"]}, {"uniref": 1})
    with pytest.raises(ValueError, match="datasets"):
        other.load_state_dict(s.state_dict())
    reweighted = TwoLevelSampler(datasets, {"uniref": 3, "mgnify": 1})
    with pytest.raises(ValueError, match="weights"):
        reweighted.load_state_dict(s.state_dict())


def test_two_level_law(datasets):
    """Datasets follow the weights; centers are uniform (not member-weighted); members are
    uniform within the center and always inside it."""
    s = TwoLevelSampler(datasets, {"uniref": 0.25, "mgnify": 0.75}, seed=1)
    n = 400_000
    b = s.sample(n)
    u = b.dataset == s.names.index("uniref")
    p = 0.25
    assert abs(u.mean() - p) < 5 * np.sqrt(p * (1 - p) / n)
    # the 20-member center is one center of 10: drawn 10% of uniref draws, not 20/29
    big = (b.center[u] == 0).mean()
    nu = u.sum()
    assert abs(big - 0.1) < 5 * np.sqrt(0.09 / nu)
    members = np.bincount(b.member[u][b.center[u] == 0], minlength=20)
    assert members.min() > 0 and members.max() - members.min() < 5 * np.sqrt(nu * 0.1 / 20) * 2
    for d, ix in enumerate(s.indexes):
        sel = b.dataset == d
        assert np.all(ix.offsets[b.center[sel]] <= b.member[sel])
        assert np.all(b.member[sel] < ix.offsets[b.center[sel] + 1])


def test_member_ids_and_unsorted_input(datasets):
    table = pa.table({"center": ["b", "a", "b", "a"], "member": ["b1", "a1", "b2", "a2"]})
    ix = ClusterIndex.from_table(table)
    assert ix.centers.to_pylist() == ["a", "b"] and ix.sizes.tolist() == [2, 2]
    s = TwoLevelSampler({"x": ix, **datasets}, {"x": 1.0, "mgnify": 1.0}, seed=0)
    b = s.sample(200)
    ids = s.member_ids(b)
    for d, c, m, i in zip(b.dataset, b.center, b.member, ids, strict=True):
        ix_d = s.indexes[d]
        assert i == ix_d.members[m].as_py()
        assert i.startswith(ix_d.centers[c].as_py())
    assert not (b.dataset == s.names.index("uniref")).any()  # weight 0: never drawn


@pytest.mark.parametrize("weights", [{"uniref": -1, "mgnify": 1}, {"uniref": 0}, {"nope": 1}])
def test_bad_weights(datasets, weights):
    with pytest.raises(ValueError):
        TwoLevelSampler(datasets, weights)
