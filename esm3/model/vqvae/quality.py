"""Reconstruction quality of a decoded structure: RMSD after optimal superposition and
CA lDDT (superposition-free).

`kabsch_rmsd` works on one chain (all given points together); `lddt_ca` is batched over
leading dimensions and can stay within packed samples (`sequence_id`).
"""

from __future__ import annotations

import torch

LDDT_THRESHOLDS = (0.5, 1.0, 2.0, 4.0)


def _points(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flatten (L, A, 3) or (N, 3) to (n, 3) with a mask broadcast over the atoms."""
    full = mask.reshape(*mask.shape, *[1] * (x.dim() - 1 - mask.dim())).expand(x.shape[:-1])
    return x.reshape(-1, 3), full.reshape(-1)


def kabsch_rmsd(pred: torch.Tensor, true: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """RMSD (Angstrom, 0-d float tensor) between the masked points of one chain after the
    rotation + translation of `pred` that best fits `true` (Kabsch; proper rotations only,
    never a reflection). pred, true (L, A, 3) or (N, 3); mask (L,), (L, A) or (N,) bool.
    NaN in `true` outside the mask is fine. No gradient is meant to flow (float64 SVD)."""
    p, m = _points(pred.detach().double(), mask)
    t, _ = _points(true.detach().double(), mask)
    p, t = p[m], t[m]
    if p.shape[0] == 0:
        return torch.tensor(float("nan"))
    p = p - p.mean(0)
    t = t - t.mean(0)
    u, _, vh = torch.linalg.svd(p.T @ t)
    # flip the last axis where the best orthogonal map would be a reflection
    d = torch.sign(torch.linalg.det(u @ vh))
    fix = torch.diag(torch.stack([torch.ones_like(d), torch.ones_like(d), d]))
    rot = u @ fix @ vh  # p @ rot ~ t
    return ((p @ rot - t).pow(2).sum(-1).mean()).sqrt().float()


def _ca(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """CA from (..., L, 3) as given, or slot 1 of (..., L, A, 3) (backbone and atom37)."""
    return x[..., 1, :] if x.dim() == mask.dim() + 2 else x


def lddt_ca(
    pred: torch.Tensor,
    true: torch.Tensor,
    mask: torch.Tensor,
    cutoff: float = 15.0,
    thresholds: tuple[float, ...] = LDDT_THRESHOLDS,
    sequence_id: torch.Tensor | None = None,
    per_residue: bool = False,
) -> torch.Tensor:
    """CA lDDT in [0, 1]: over pairs i != j of masked residues (of one packed sample) whose
    true CA distance is under `cutoff`, the fraction of thresholds that |d_pred - d_true|
    stays below, averaged. pred, true: CA (..., L, 3) or backbone/atom37 (..., L, A, 3);
    mask (..., L) bool. Returns (...) global scores (mean over all pairs, AlphaFold's
    global form), or (..., L) per-residue scores with `per_residue` (0 where a residue
    has no pair)."""
    p, t = _ca(pred, mask).float(), _ca(true, mask).float()
    t = torch.where(mask[..., None], t, torch.zeros_like(t))
    p = torch.where(mask[..., None], p, torch.zeros_like(p))
    d_true = torch.cdist(t, t)
    d_pred = torch.cdist(p, p)
    L = mask.shape[-1]
    pairs = mask[..., :, None] & mask[..., None, :] & (d_true < cutoff)
    pairs = pairs & ~torch.eye(L, dtype=torch.bool, device=mask.device)
    if sequence_id is not None:
        pairs = pairs & (sequence_id[..., :, None] == sequence_id[..., None, :])
    err = (d_pred - d_true).abs()
    score = torch.stack([(err < thr).float() for thr in thresholds]).mean(0)
    score = torch.where(pairs, score, torch.zeros_like(score))
    if per_residue:
        return score.sum(-1) / pairs.sum(-1).clamp(min=1)
    return score.sum((-1, -2)) / pairs.sum((-1, -2)).clamp(min=1)
