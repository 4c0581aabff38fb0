"""The k-means structure tokenizer on real structures: invariance, save/load, the stage."""

from __future__ import annotations

import numpy as np
import pytest

from esm3.data.structures import stages
from esm3.data.structures.geometry import dihedrals, local_frames, random_rigid
from esm3.data.structures.io import read_structure
from esm3.data.structures.records import read_shard
from esm3.data.structures.stages import (
    StructureStageConfig,
    fit_structure_codebook,
    process_structure_shard,
    tokenize_structure_shard,
)
from esm3.tokenize import structure
from esm3.tokenize.structure import (
    NO_TOKEN,
    KMeansStructureTokenizer,
    StructureTokenizer,
    _kmeans,
    picked_features,
    residue_features,
)
from tests.realdata import mda_file


@pytest.fixture(scope="module")
def backbones() -> list[np.ndarray]:
    return [c.backbone for c in read_structure(mda_file("3PWP.cif.gz")).chains]


@pytest.fixture(scope="module")
def tokenizer(backbones) -> KMeansStructureTokenizer:
    return KMeansStructureTokenizer(codebook_size=32, iterations=10, seed=0).fit(backbones)


def test_tokens_identical_after_random_rotation_and_translation(tokenizer):
    bb = read_structure(mda_file("1BD2.cif.gz")).chains[0].backbone  # not in the training set
    tokens = tokenizer.encode(bb)
    assert tokens.dtype == np.int16 and tokens.shape == (len(bb),)
    assert len(np.unique(tokens)) > 10  # the codebook is used, not one code for all
    rng = np.random.default_rng(7)
    for _ in range(5):
        rot, shift = random_rigid(rng, scale=100.0)
        moved = (bb.astype(np.float64) @ rot.T + shift).astype(np.float32)
        assert not np.allclose(moved, bb)
        np.testing.assert_array_equal(tokenizer.encode(moved), tokens)


def test_a_mirror_image_is_not_the_same_structure(tokenizer):
    # frames are right-handed, so tokens see chirality; reflection changes them
    bb = read_structure(mda_file("1BD2.cif.gz")).chains[0].backbone
    mirrored = bb * np.array([-1.0, 1.0, 1.0], dtype=np.float32)
    assert (tokenizer.encode(mirrored) != tokenizer.encode(bb)).mean() > 0.3


def test_frames_are_rotations_and_dihedrals_match_a_helix():
    (chain,) = read_structure(mda_file("5PTI.cif.gz")).chains
    rot, origin = local_frames(chain.backbone)
    np.testing.assert_allclose(
        rot @ rot.transpose(0, 2, 1), np.broadcast_to(np.eye(3), rot.shape), atol=1e-6
    )
    np.testing.assert_allclose(np.linalg.det(rot), 1.0, atol=1e-6)
    phi, psi, _ = np.degrees(dihedrals(chain.backbone)).T
    helix = slice(47, 53)  # inside the C-terminal alpha helix (DSSP: H at residues 48-55)
    assert np.all(np.abs(phi[helix] + 63) < 20) and np.all(np.abs(psi[helix] + 42) < 20)
    assert np.isnan(phi[0]) and np.isnan(psi[-1])


def test_missing_backbone_gets_no_token(tokenizer):
    (chain,) = read_structure(mda_file("1YJP_invalid.cif.gz")).chains  # residue 1 lacks N
    tokens = tokenizer.encode(chain.backbone)
    assert tokens[0] == NO_TOKEN and (tokens[1:] >= 0).all()
    feats, idx = residue_features(chain.backbone)
    assert idx.tolist() == list(range(1, 7)) and np.isfinite(feats).all()


def test_save_load_roundtrip_and_interface(tokenizer, tmp_path, backbones):
    path = tmp_path / "codebook.npz"
    tokenizer.save(path)
    loaded = KMeansStructureTokenizer.load(path)
    assert isinstance(loaded, StructureTokenizer)
    assert loaded.codebook_size == 32
    for bb in backbones:
        np.testing.assert_array_equal(loaded.encode(bb), tokenizer.encode(bb))


def test_fit_is_deterministic_and_needs_enough_residues(backbones):
    a = KMeansStructureTokenizer(16, iterations=5, seed=3).fit(backbones)
    b = KMeansStructureTokenizer(16, iterations=5, seed=3).fit(backbones)
    np.testing.assert_array_equal(a.centroids, b.centroids)
    with pytest.raises(ValueError, match="need >= codebook_size=4096"):
        KMeansStructureTokenizer().fit(backbones[:1])
    with pytest.raises(RuntimeError, match="no codebook"):
        KMeansStructureTokenizer(8).encode(backbones[0])


def test_codebook_and_token_stages(tmp_path):
    shard = tmp_path / "pdb.parquet"
    files = [mda_file("3PWP.cif.gz"), mda_file("1YJP_invalid.cif.gz")]
    process_structure_shard(files, shard, StructureStageConfig("pdb", ss8=False))
    summary = fit_structure_codebook([shard], tmp_path / "cb.npz", codebook_size=16, iterations=5)
    assert summary["chains"] == 6 and summary["residues"] == 836
    assert fit_structure_codebook([shard], tmp_path / "cb.npz")["skipped"] is True
    result = tokenize_structure_shard(shard, tmp_path / "tok.parquet", tmp_path / "cb.npz")
    rows = read_shard(tmp_path / "tok.parquet")
    assert result.summary["tokens"] == 835  # 1YJP_invalid residue 1 has no N
    invalid = next(r for r in rows if r["id"] == "1YJP_invalid_A")
    assert invalid["structure_tokens"][0] == NO_TOKEN
    assert all(0 <= t < 16 for r in rows for t in r["structure_tokens"] if t != NO_TOKEN)
    # the same codebook inside the structures stage gives the same tokens
    direct = process_structure_shard(
        files,
        tmp_path / "d.parquet",
        StructureStageConfig("pdb", ss8=False),
        tokenizer=tmp_path / "cb.npz",
    )
    assert direct.summary["chains_kept"] == 6
    assert [r["structure_tokens"] for r in read_shard(tmp_path / "d.parquet")] == [
        r["structure_tokens"] for r in rows
    ]


# --- the fit reads the backbones twice and keeps only the sampled residues -----------------

FIT_FILES = ("3PWP.cif.gz", "1YJP_invalid.cif.gz", "5PTI.cif.gz", "1BD2.cif.gz")


@pytest.fixture(scope="module")
def many_backbones() -> list[np.ndarray]:
    """Real chains, one with a residue missing its N (so complete != all residues)."""
    return [c.backbone for f in FIT_FILES for c in read_structure(mda_file(f)).chains]


def fit_in_memory(backbones, k: int, iterations: int, max_residues: int, seed: int):
    """The fit as it was before streaming: every residue's features in memory, then sampled."""
    x = np.concatenate([residue_features(bb)[0] for bb in backbones])
    rng = np.random.default_rng(seed)
    if len(x) > max_residues:
        x = x[rng.choice(len(x), max_residues, replace=False)]
    return _kmeans(x, k, iterations, rng)


def test_picked_features_equal_rows_of_all_features(many_backbones, monkeypatch):
    every = np.concatenate([residue_features(bb)[0] for bb in many_backbones])
    first = len(residue_features(many_backbones[0])[0])
    picks = np.array([first + 3, 5, first, len(every) - 1, 0, first - 1])
    calls = []

    def counted(bb):
        calls.append(len(bb))
        return residue_features(bb)

    monkeypatch.setattr(structure, "residue_features", counted)
    np.testing.assert_array_equal(picked_features(many_backbones, picks), every[picks])
    # only the chains holding a pick get features: the first, the second and the last
    assert calls == [len(many_backbones[i]) for i in (0, 1, -1)]


@pytest.mark.parametrize("max_residues", [300, 100_000])  # sampled / every residue
def test_fit_equals_the_in_memory_fit(many_backbones, max_residues):
    want = fit_in_memory(many_backbones, 16, 5, max_residues, seed=4)
    tok = KMeansStructureTokenizer(16, iterations=5, max_train_residues=max_residues, seed=4)
    np.testing.assert_array_equal(tok.fit(many_backbones).centroids, want)
    # a one-shot iterator is read once and gives the same codebook
    again = KMeansStructureTokenizer(16, iterations=5, max_train_residues=max_residues, seed=4)
    np.testing.assert_array_equal(again.fit(iter(many_backbones)).centroids, want)


def test_codebook_stage_streams_shards_to_the_same_codebook(tmp_path, monkeypatch):
    cfg = StructureStageConfig("pdb", ss8=False)
    shards = [tmp_path / "a.parquet", tmp_path / "b.parquet"]
    process_structure_shard([mda_file(f) for f in FIT_FILES[:2]], shards[0], cfg)
    process_structure_shard([mda_file(f) for f in FIT_FILES[2:]], shards[1], cfg)
    backbones = [
        np.asarray(r["coords"], dtype=np.float32).reshape(-1, 3, 3)
        for s in shards
        for r in read_shard(s)
    ]
    monkeypatch.setattr(stages, "BACKBONE_BATCH_ROWS", 2)  # batches split the shards
    summary = fit_structure_codebook(shards, tmp_path / "cb.npz", 16, 300, 5, seed=4)
    assert summary["chains"] == len(backbones)
    assert summary["residues"] == sum(len(b) for b in backbones)
    np.testing.assert_array_equal(
        KMeansStructureTokenizer.load(tmp_path / "cb.npz").centroids,
        fit_in_memory(backbones, 16, 5, 300, seed=4),
    )
