"""The whole corruption recipe, the Protein record layouts, and batching."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from esm3.tasks.batching import bucket_rows, collate, pack_rows
from esm3.tasks.config import TaskConfig, TrackNoise
from esm3.tasks.corrupt import CATEGORICAL, corrupt, inverse_folding_corrupt
from esm3.tasks.sample import Protein
from esm3.tasks.schedules import cdf
from esm3.tokenize.specials import (
    SEQUENCE_BOS,
    SEQUENCE_CHAINBREAK,
    SEQUENCE_EOS,
    SEQUENCE_MASK,
    SEQUENCE_PAD,
)
from tests.function_tables import function_tables
from tests.test_tasks_augment import real_protein, real_proteins

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _decorated(p: Protein, seed: int = 0) -> Protein:
    """A real chain with the other tracks filled in (SASA, SS8, tokens, annotations)."""
    rng = np.random.default_rng(seed)
    L = len(p)
    has = np.isfinite(p.coords).all(axis=(1, 2))
    return dataclasses.replace(
        p,
        sasa=np.where(has, rng.random(L) * 120, np.nan).astype(np.float32),
        ss8="".join(rng.choice(list("GHITEBSC"), L)),
        structure_tokens=np.where(has, rng.integers(0, 4096, L), -1),
        function=[("IPR000001", 1, L // 2), ("IPR000719", L // 3, L)],
        residue_annotations=[("site", 5, 5)],
    )


CFG = TaskConfig(residue_labels=("site",), function_files=function_tables())
MASK = {t: CFG.track_sizes().specials(t).mask for t in CATEGORICAL}


def test_from_record_structure_and_sequence_layouts():
    p = real_protein("5PTI.cif.gz")
    L = len(p)
    row = {
        "id": "5PTI_A",
        "dataset": "pdb",
        "sequence": p.sequence,
        "coords": p.coords.reshape(-1).tolist(),
        "plddt": None,
        "sasa": [1.0] * L,
        "ss8": "C" * L,
        "structure_tokens": list(range(L)),
        "annotations": [{"ipr": "IPR002223", "start": 1, "end": 58}],
    }
    q = Protein.from_record(row)
    assert q.coords.shape == (L, 3, 3) and np.allclose(q.coords, p.coords, equal_nan=True)
    assert q.function == [("IPR002223", 1, 58)] and q.plddt is None and q.dataset == "pdb"
    s = Protein.from_record({"id": "u1", "dataset": "uniref", "sequence": "MKV", "length": 3})
    assert s.coords is None and not s.has_structure and s.chain_ids.tolist() == [0, 0, 0]
    with pytest.raises(
        ValueError, match=r"record '5PTI_A': column 'sasa' has 3 values, expected 58"
    ):
        Protein.from_record(row | {"sasa": [1.0, 2.0, 3.0]})
    with pytest.raises(ValueError, match=r"record 'u2': column 'sequence' missing or empty"):
        Protein.from_record({"id": "u2", "sequence": None})
    with pytest.raises(ValueError, match=r"record 'u3': column 'length' 4 != 3"):
        Protein.from_record({"id": "u3", "sequence": "MKV", "length": 4})


def test_masked_positions_never_leak_and_shapes():
    rng = np.random.default_rng(0)
    for seed in range(60):
        p = _decorated(real_proteins()[seed % 4], seed)
        inp, tgt, lm = corrupt(p, rng, CFG)
        T = inp["sequence"].shape[0]
        assert inp["sequence"][0] == SEQUENCE_BOS and inp["sequence"][-1] == SEQUENCE_EOS
        for t in CATEGORICAL:
            x, y, m = inp[t], tgt[t], lm[t]
            assert x.shape[0] == T and m.shape == (T,)
            xm = x if x.ndim == 1 else x[:, 0]
            assert (xm[m] == MASK[t]).all()  # every loss position is hidden in the input
            given = xm != MASK[t]
            assert (x[given] == y[given]).all()  # what is given is the truth
        assert inp["coords"].shape == (T, 3, 3)
        assert inp["chain_id"].shape == (T,) and inp["residue_index"].shape == (T,)


def test_shown_coordinates_are_true_plus_small_noise():
    p = _decorated(real_protein("adk_open.pdb"))
    rng = np.random.default_rng(1)
    diffs = []
    for _ in range(40):
        inp, _, _ = corrupt(p, rng, CFG)
        shown = np.isfinite(inp["coords"]).all(axis=(1, 2))
        idx = inp["residue_index"][shown]
        assert (idx >= 0).all()  # specials never carry coordinates
        diffs.append((inp["coords"][shown] - p.coords[idx]).ravel())
    d = np.concatenate(diffs)
    assert d.std() == pytest.approx(0.1, rel=0.05) and abs(d.mean()) < 0.01


def test_chains_chainbreaks_and_gaps():
    cfg = dataclasses.replace(CFG, gap_chain_p=0.2, interface_prob=0.0)
    p = real_protein("adk_open.pdb")
    rng = np.random.default_rng(2)
    seen_multi = 0
    for _ in range(100):
        inp, tgt, _ = corrupt(p, rng, cfg)
        breaks = np.flatnonzero(tgt["sequence"] == SEQUENCE_CHAINBREAK)
        n_chains = breaks.size + 1
        assert n_chains <= 9
        assert inp["chain_id"].max() == n_chains - 1
        ri = inp["residue_index"]
        for b in breaks:  # residues dropped across every chainbreak: >= 10
            assert ri[b + 1] - ri[b - 1] - 1 >= 10
        assert (np.diff(ri[ri >= 0]) >= 1).all()
        seen_multi += n_chains > 1
    assert seen_multi > 50


def test_interface_task_two_chains():
    cfg = dataclasses.replace(CFG, interface_prob=1.0)
    p = real_protein("adk_open.pdb")
    inp, tgt, _ = corrupt(p, np.random.default_rng(3), cfg)
    assert (tgt["sequence"] == SEQUENCE_CHAINBREAK).sum() == 1
    assert set(inp["chain_id"].tolist()) == {0, 1}


def test_coordination_task_shows_3_to_9_residues():
    cfg = dataclasses.replace(CFG, coordination_prob=1.0, interface_prob=0.0, gap_chain_p=1.0)
    p = real_protein("1BD2.cif.gz", 0)
    rng = np.random.default_rng(4)
    for _ in range(30):
        inp, _, _ = corrupt(p, rng, cfg)
        shown = np.isfinite(inp["coords"]).all(axis=(1, 2)).sum()
        assert 3 <= shown <= 9


def test_track_dropout_rates():
    p = _decorated(real_protein("5PTI.cif.gz"))
    cfg = dataclasses.replace(CFG, gap_chain_p=1.0, interface_prob=0.0)
    rng = np.random.default_rng(5)
    dropped = {t: 0 for t in CATEGORICAL}
    n, L = 800, len(p)
    for _ in range(n):
        inp, tgt, _ = corrupt(p, rng, cfg)
        res = inp["residue_index"] >= 0
        for t in CATEGORICAL:
            x = inp[t] if inp[t].ndim == 1 else inp[t][:, 0]
            dropped[t] += bool((x[res] == MASK[t]).all())
    grid = np.linspace(0, 1, 100001)
    for t in CATEGORICAL:
        noise = getattr(cfg, t)
        # P(all L masked) = dropout + (1 - dropout) E[rate^L], E[r^L] = int L r^(L-1) (1-F) dr
        tail = np.trapezoid(L * grid ** (L - 1) * (1 - cdf(noise.schedule, grid)), grid)
        expected = noise.dropout + (1 - noise.dropout) * tail
        assert dropped[t] / n == pytest.approx(expected, abs=0.04), t


def test_sequence_only_protein_has_no_structure_loss():
    p = Protein(sequence="MKTAYIAKQRQISFVKSHFSRQ", id="s")
    inp, _, lm = corrupt(p, np.random.default_rng(0), CFG)
    res = inp["residue_index"] >= 0
    assert np.isnan(inp["coords"]).all()
    assert (inp["structure"][res] == MASK["structure"]).all() and not lm["structure"].any()
    assert not lm["ss8"].any() and not lm["function"].any()


def test_long_protein_cropped_to_a_fragment_without_bos_eos():
    cfg = dataclasses.replace(CFG, max_length=100, gap_chain_p=1.0)
    p = real_protein("adk_open.pdb")
    inp, tgt, _ = corrupt(p, np.random.default_rng(0), cfg)
    assert inp["sequence"].shape[0] == 100 and (inp["residue_index"] >= 0).all()
    assert not np.isin(tgt["sequence"], [SEQUENCE_BOS, SEQUENCE_EOS]).any()
    start = inp["residue_index"][0]
    assert (inp["residue_index"] == np.arange(start, start + 100)).all()
    # a protein that fits keeps both ends
    short = dataclasses.replace(cfg, max_length=len(p) + 2)
    inp, tgt, _ = corrupt(p, np.random.default_rng(0), short)
    assert tgt["sequence"][0] == SEQUENCE_BOS and tgt["sequence"][-1] == SEQUENCE_EOS


def test_bad_inputs():
    with pytest.raises(ValueError, match="record 'b1': unknown amino-acid letter 'J'"):
        corrupt(Protein(sequence="MKJ", id="b1"), np.random.default_rng(0), CFG)
    with pytest.raises(ValueError, match="shape"):
        Protein(sequence="MK", coords=np.zeros((3, 3, 3)))
    with pytest.raises(ValueError, match="tasks.ss8.dropout must be in"):
        TaskConfig(ss8=TrackNoise("square_root", 1.5))
    # NaN atoms: that residue has no coordinates, never shown, no structure target
    p = _decorated(real_protein("5PTI.cif.gz"))
    p.coords = p.coords.copy()  # the loaded chain is shared (cached) between tests
    p.coords[10, 0, 0] = np.nan
    p.structure_tokens[10] = 7
    cfg = dataclasses.replace(CFG, coordinates=TrackNoise("uniform", 0.0), gap_chain_p=1.0)
    inp, _, _ = corrupt(p, np.random.default_rng(0), cfg)
    pos = np.flatnonzero(inp["residue_index"] == 10)[0]
    assert np.isnan(inp["coords"][pos]).all()


def test_deterministic_given_seed():
    p = _decorated(real_protein("adk_open.pdb"))
    a = corrupt(p, np.random.default_rng(42), CFG)
    b = corrupt(p, np.random.default_rng(42), CFG)
    for x, y in zip(a, b, strict=True):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def test_inverse_folding_task():
    p = _decorated(real_protein("5PTI.cif.gz"))
    inp, tgt, lm = inverse_folding_corrupt(p, np.random.default_rng(0), CFG)
    res = inp["residue_index"] >= 0
    assert (inp["sequence"][res] == SEQUENCE_MASK).all() and lm["sequence"][res].all()
    assert not any(lm[t].any() for t in CATEGORICAL if t != "sequence")
    assert np.isfinite(inp["coords"][res]).all(axis=(1, 2)).mean() > 0.95
    with pytest.raises(ValueError, match="needs coordinates"):
        inverse_folding_corrupt(Protein(sequence="MKV", id="z"), np.random.default_rng(0), CFG)


def test_batching_bucketed_and_packed():
    rng = np.random.default_rng(0)
    samples = [corrupt(_decorated(p), rng, CFG) for p in real_proteins()]
    lengths = [s[0]["sequence"].shape[0] for s in samples]
    padded = collate(samples)
    B, T = padded.inputs["sequence"].shape
    assert (B, T) == (4, max(lengths))
    assert padded.padding_fraction == pytest.approx(1 - sum(lengths) / (B * T))
    pad = padded.inputs["sequence_id"] < 0
    assert (padded.inputs["sequence"][pad] == SEQUENCE_PAD).all()
    assert (padded.inputs["structure"][pad] == CFG.track_sizes().specials("structure").pad).all()
    assert (padded.inputs["average_plddt"][pad] == 1).all() and (
        padded.inputs["chain_id"][pad] == -1
    ).all()
    rows = pack_rows(lengths, 300)
    assert sorted(i for r in rows for i in r) == [0, 1, 2, 3]
    assert all(sum(lengths[i] for i in r) <= 300 for r in rows)
    packed = collate(samples, rows)
    assert packed.padding_fraction < padded.padding_fraction
    assert packed.n_tokens == sum(lengths)
    sid, pos = packed.inputs["sequence_id"], packed.inputs["positions"]
    assert (pos[sid >= 0] < max(lengths)).all() and (pos[:, 0] == 0).all()
    chain = packed.inputs["chain_id"]
    for b in range(len(rows)):  # each packed sample's chains are its own
        spans = [set(chain[b][sid[b] == j].tolist()) for j in range(len(rows[b]))]
        assert all(not (x & y) for i, x in enumerate(spans) for y in spans[i + 1 :])
    with pytest.raises(ValueError, match="more than a row"):
        pack_rows([10, 400], 300)
    batches = bucket_rows([5, 50, 7, 52, 6], max_tokens=110)
    assert [sorted(i for r in b for i in r) for b in batches] == [[0, 2, 4], [1, 3]]
