"""The structure tokenizer's losses and quality metrics on real chains (MDAnalysisTests
files) and hand-made examples whose answers are worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from esm3.model.vqvae import losses as LS
from esm3.model.vqvae.quality import kabsch_rmsd, lddt_ca
from tests.test_tasks_augment import real_protein
from tests.vqvae_data import atom37_batch

GEOMETRIC = (LS.backbone_distance_loss, LS.backbone_direction_loss)
BINNED = (
    (LS.distogram_loss, lambda t, m: LS.distogram_bins(_cb_distances(t, m)), 64),
    (LS.direction_bins_loss, LS.direction_targets, 16),
)


def _cb_distances(true: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    cb = LS.ideal_cb(torch.where(mask[..., None, None], true, 0.0))
    return torch.cdist(cb, cb)


def _chain(name: str = "adk_open.pdb") -> tuple[torch.Tensor, torch.Tensor]:
    """(1, L, 3, 3) backbone and (1, L) mask of a real chain."""
    coords = torch.from_numpy(real_protein(name).coords)[None]
    return coords, torch.isfinite(coords).all(-1).all(-1)


def _noisy(x: torch.Tensor, scale: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.nan_to_num(x) + scale * torch.randn(x.shape, generator=g)


def _rotation(seed: int = 1) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(seed)))
    return q * torch.sign(torch.linalg.det(q))  # proper: det +1


def _moved(x: torch.Tensor, seed: int = 1) -> torch.Tensor:
    return x @ _rotation(seed).T + torch.tensor([12.0, -7.0, 30.0])


def _one_hot_logits(target: torch.Tensor, n: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(target, n).float() * 1e3


# ---------------------------------------------------------------- minimum and invariance


def test_geometric_losses_vanish_when_prediction_is_true():
    true, mask = _chain()
    for loss in GEOMETRIC:
        term = loss(true.clone(), true, mask)
        assert term.value.item() == pytest.approx(0.0, abs=1e-6)
        assert term.count > 0


def test_classification_losses_reach_zero_on_the_true_classes():
    true, mask = _chain()
    for loss, targets, n in BINNED:
        assert loss(_one_hot_logits(targets(true, mask), n), true, mask).value.item() < 1e-3
    tokens = torch.randint(4, 24, mask.shape, generator=torch.Generator().manual_seed(0))
    assert LS.inverse_folding_loss(_one_hot_logits(tokens, 64), tokens, mask).value < 1e-3


def test_geometric_losses_are_invariant_to_moving_the_prediction():
    true, mask = _chain()
    pred = _noisy(true, 1.0)
    for loss in GEOMETRIC:
        a, b = loss(pred, true, mask).value, loss(_moved(pred), true, mask).value
        assert a > 0.1
        assert b.item() == pytest.approx(a.item(), rel=1e-4)


def test_classification_targets_are_invariant_to_moving_the_true_structure():
    true, mask = _chain()
    moved = _moved(torch.nan_to_num(true))
    for _, targets, _ in BINNED:
        a, b = targets(true, mask), targets(moved, mask)
        # float rounding may move a value sitting on a bin edge, nothing else
        assert (a == b).float().mean() > 0.9995
        assert (a - b).abs().max() <= 1


# ------------------------------------------------------------------------- by hand


def test_distance_loss_matches_its_closed_form_on_two_residues():
    true = torch.tensor([[[0.0, 0, 0], [1.5, 0, 0], [2, 1, 0]],
                         [[3.5, 0, 0], [5, 0, 0], [5, 1.5, 0]]])[None]  # fmt: skip
    pred = true.clone()
    pred[0, 1] += torch.tensor([0.0, 0.0, 2.0])  # lift residue 2 by 2 A
    mask = torch.ones(1, 2, dtype=torch.bool)
    p, t = pred.reshape(6, 3).numpy(), true.reshape(6, 3).numpy()
    total = 0.0
    for i in range(6):
        for j in range(6):
            dp, dt = np.linalg.norm(p[i] - p[j]), np.linalg.norm(t[i] - t[j])
            total += min((dp - dt) ** 2, 25.0)
    term = LS.backbone_distance_loss(pred, true, mask)
    assert term.count.item() == 36
    assert term.value.item() == pytest.approx(total / 36, rel=1e-5)


def test_a_huge_distance_error_counts_exactly_25():
    true, mask = _chain()
    true, mask = true[:, :2], mask[:, :2]
    pred = true.clone()
    pred[0, 1] += 1000.0  # every atom pair across the two residues is off by far more than 5 A
    # 18 of the 36 atom pairs cross the residues; within-residue pairs are exact
    assert LS.backbone_distance_loss(pred, true, mask).value.item() == pytest.approx(12.5)


def test_a_huge_direction_error_counts_exactly_20():
    # one ideal residue in the xy plane: N->CA, CA->C and n_CA (along z) only
    true = torch.tensor([[[[0.5256, 1.3612, 0.0], [0.0, 0.0, 0.0], [-1.5251, 0.0, 0.0]]]])
    mask = torch.ones(1, 1, dtype=torch.bool)
    term = LS.backbone_direction_loss(true * 100.0, true, mask)
    assert term.count.item() == 9
    # n_CA is orthogonal to N->CA and CA->C in both: those 4 of the 9 pairs stay exact (0);
    # the other 5 grow by a factor of 1e4 or more and count 20 each
    assert term.value.item() == pytest.approx(5 * 20.0 / 9)


def test_direction_vectors_need_their_neighbour_in_the_same_sample():
    true, mask = _chain()
    x, m = true[:, :6], mask[:, :6].clone()
    m[0, 3] = False
    sid = torch.tensor([[0, 0, 0, 0, 1, 1]])
    _, valid = LS.backbone_vectors(x, m, sid)
    # columns: N->CA, CA->C, C->N(next), n_CA, n_N (needs prev), n_C (needs next)
    assert valid[0, :, 2].tolist() == [True, True, False, False, True, False]
    assert valid[0, :, 4].tolist() == [False, True, True, False, False, True]


def test_distogram_bins_put_a_distance_on_an_edge_in_the_lower_class():
    edges = LS.DISTOGRAM_EDGES
    assert edges[0].item() == 2.3125 and edges[-1].item() == 21.6875 and len(edges) == 63
    d = torch.tensor([0.0, 2.3125, 2.3126, 2.625, 2.6251, 21.6875, 21.69, 100.0])
    assert LS.distogram_bins(d).tolist() == [0, 0, 1, 1, 2, 62, 63, 63]


def test_direction_bins_of_a_vector_with_itself_are_the_last_bin():
    d = torch.tensor([-1.0, -0.875, -0.8749, 0.0, 0.99, 1.0])
    assert LS.direction_bins(d).tolist() == [0, 1, 1, 8, 15, 15]
    true, mask = _chain()
    target = LS.direction_targets(true[:, :20], mask[:, :20])
    diagonal = target[0, torch.arange(20), torch.arange(20)]  # (20, 6)
    same_vector = [k for k, (p, q) in enumerate(LS.DIRECTION_PAIRS) if p == q]
    assert (diagonal[:, same_vector] == 15).all()
    # CA->C . normal is 0 by construction: the edge between the two middle bins
    assert set(diagonal[:, LS.DIRECTION_PAIRS.index((0, 2))].tolist()) <= {7, 8}


# --------------------------------------------------------------------------- packing


def _pack(*rows: torch.Tensor) -> torch.Tensor:
    return torch.cat(rows, 1)


def _sample_ids(*lengths: int) -> torch.Tensor:
    return torch.cat([torch.full((1, n), k) for k, n in enumerate(lengths)], 1)


def _check_weighted(packed: LS.LossTerm, sa: LS.LossTerm, sb: LS.LossTerm) -> None:
    weighted = (sa.value * sa.count + sb.value * sb.count) / (sa.count + sb.count)
    assert packed.count.item() == sa.count.item() + sb.count.item()
    assert packed.value.item() == pytest.approx(weighted.item(), rel=1e-5)


def test_pairs_across_packed_samples_never_count():
    (ta, ma), (tb, mb) = _chain("adk_open.pdb"), _chain("5PTI.cif.gz")
    la, lb = ma.shape[1], mb.shape[1]
    true, mask, sid = _pack(ta, tb), _pack(ma, mb), _sample_ids(la, lb)
    pa, pb = _noisy(ta, 1.0), _noisy(tb, 1.0, seed=3)
    for loss in GEOMETRIC:
        packed = loss(_pack(pa, pb), true, mask, sid)
        _check_weighted(packed, loss(pa, ta, ma), loss(pb, tb, mb))
    g = torch.Generator().manual_seed(5)
    for loss, _, n in BINNED:
        shape = (6, 16) if n == 16 else (64,)
        logits = torch.randn(1, la + lb, la + lb, *shape, generator=g)
        packed = loss(logits, true, mask, sid)
        sa = loss(logits[:, :la, :la], ta, ma)
        _check_weighted(packed, sa, loss(logits[:, la:, la:], tb, mb))


def test_atom_pairs_across_packed_samples_never_count():
    (ta, ma, _), (tb, mb, _) = atom37_batch("adk_open.pdb"), atom37_batch("5PTI.cif.gz")
    pa, pb = _noisy(ta, 0.7), _noisy(tb, 0.7, seed=3)
    sid = _sample_ids(ta.shape[1], tb.shape[1])
    for loss in (LS.all_atom_distance_loss, LS.all_atom_direction_loss):
        packed = loss(_pack(pa, pb), _pack(ta, tb), _pack(ma, mb), sid)
        _check_weighted(packed, loss(pa, ta, ma), loss(pb, tb, mb))


# ---------------------------------------------------------------------- missing residues


def test_masked_residues_are_ignored_and_gradients_stay_finite():
    true, mask = _chain()
    mask = mask.clone()
    mask[0, 50:60] = False
    true = true.clone()
    true[0, 50:60] = float("nan")
    pred = _noisy(true, 1.0)
    other = pred.clone()
    other[0, 50:60] = 1e4  # garbage where there is no truth
    logits = torch.randn(1, 214, 214, 64)
    for loss in GEOMETRIC:
        p = other.clone().requires_grad_(True)
        term = loss(p, true, mask)
        assert term.value.item() == pytest.approx(loss(pred, true, mask).value.item(), rel=1e-6)
        term.value.backward()
        assert torch.isfinite(p.grad).all() and (p.grad[0, 50:60] == 0).all()
    term = LS.distogram_loss(logits, true, mask)
    assert torch.isfinite(term.value) and term.count.item() == int(mask.sum()) ** 2


# ---------------------------------------------------------------------------- all atom


def test_all_atom_losses_vanish_and_are_invariant():
    true, amask, _ = atom37_batch("adk_open.pdb")
    pred = _noisy(true, 0.5)
    for loss in (LS.all_atom_distance_loss, LS.all_atom_direction_loss):
        assert loss(torch.nan_to_num(true), true, amask).value.item() == pytest.approx(0, abs=1e-5)
        a, b = loss(pred, true, amask), loss(_moved(pred), true, amask)
        assert a.value > 0.01 and a.count > 1_000_000
        assert b.value.item() == pytest.approx(a.value.item(), rel=1e-4)


def test_all_atom_distance_loss_on_backbone_atoms_equals_the_backbone_loss():
    true, amask, _ = atom37_batch("5PTI.cif.gz")
    pred = _noisy(true, 1.0)
    only_bb = amask.clone()
    only_bb[..., 3:] = False
    bb_mask = amask[..., :3].all(-1)
    a = LS.all_atom_distance_loss(pred, true, only_bb)
    b = LS.backbone_distance_loss(pred[..., :3, :], true[..., :3, :], bb_mask)
    assert a.count == b.count
    assert a.value.item() == pytest.approx(b.value.item(), rel=1e-5)


def test_plddt_loss_reaches_zero_on_the_true_lddt_bins():
    true, mask = _chain("5PTI.cif.gz")
    pred = _noisy(true, 1.5)
    score = lddt_ca(pred, true, mask, per_residue=True)
    logits = _one_hot_logits(LS.plddt_bins(score), 50)
    assert LS.plddt_loss(logits, pred, true, mask).value.item() < 1e-3
    assert LS.plddt_loss(torch.zeros_like(logits), pred, true, mask).value.item() == pytest.approx(
        math.log(50), rel=1e-5
    )


def test_pae_targets_are_zero_for_the_truth_and_invariant_to_moving_the_prediction():
    true, mask = _chain("5PTI.cif.gz")
    pairs = mask[0][:, None] & mask[0][None]
    assert LS.aligned_errors(true, true)[0][pairs].max() < 1e-4
    pred = _noisy(true, 1.0)
    a, b = LS.aligned_errors(pred, true), LS.aligned_errors(_moved(pred), true)
    torch.testing.assert_close(a[0][pairs], b[0][pairs], atol=1e-3, rtol=0)
    target = LS.pae_bins(a)
    assert LS.pae_loss(_one_hot_logits(target, 64), pred, true, mask).value.item() < 1e-3
    assert LS.pae_bins(torch.tensor([0.0, 1e-3, 0.5, 0.51, 31.0, 40.0])).tolist() == [
        0, 1, 1, 2, 62, 63,
    ]


# ----------------------------------------------------------------------------- quality


def test_kabsch_rmsd_of_a_moved_copy_is_zero_and_of_a_scaled_copy_is_closed_form():
    true, mask = _chain()
    true, mask = true[0], mask[0]  # one chain: (L, 3, 3), (L,)
    assert kabsch_rmsd(_moved(torch.nan_to_num(true)), true, mask).item() < 1e-4
    ca = torch.nan_to_num(true[:, 1])
    centred = ca - ca.mean(0)
    scaled = 1.1 * centred + torch.tensor([3.0, 4.0, 5.0])  # best rotation stays identity
    expected = 0.1 * centred.pow(2).sum(-1).mean().sqrt()
    assert kabsch_rmsd(scaled, ca, mask).item() == pytest.approx(expected.item(), rel=1e-4)


def test_kabsch_rmsd_never_reflects():
    true, mask = _chain()
    mirror = torch.nan_to_num(true[0]) * torch.tensor([-1.0, 1.0, 1.0])
    assert kabsch_rmsd(mirror, true[0], mask[0]) > 1.0


def test_lddt_of_identical_is_one_and_of_scrambled_is_low():
    true, mask = _chain()
    ca = true[:, :, 1]
    assert lddt_ca(ca, true, mask).item() == pytest.approx(1.0)
    perm = torch.randperm(ca.shape[1], generator=torch.Generator().manual_seed(0))
    assert lddt_ca(torch.nan_to_num(ca)[:, perm], true, mask).item() < 0.2
    moved = lddt_ca(_moved(torch.nan_to_num(true)), true, mask)
    assert moved.item() == pytest.approx(1.0)


def test_lddt_ignores_masked_residues():
    true, mask = _chain()
    mask = mask.clone()
    mask[0, :30] = False
    pred = _noisy(true, 1.0)
    other = pred.clone()
    other[0, :30] = 500.0
    assert lddt_ca(other, true, mask).item() == pytest.approx(lddt_ca(pred, true, mask).item())
