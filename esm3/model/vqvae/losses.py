"""The structure tokenizer's training losses (paper A.1.7.3), as pure functions.

Every loss takes the residues with true coordinates (`mask`, (B, L) bool; atom37 losses an
atom mask (B, L, 37)) and the packed sample of each position (`sequence_id` (B, L), or
None for one sample per row): pairs across samples never count. A loss is the mean over
its valid pairs (or positions), returned with their number as a `LossTerm`, so terms from
several batches combine as count-weighted means; with no valid pair the value is 0 (still
attached to the prediction's graph). True coordinates may be NaN outside the mask.

Geometric losses compare pairwise quantities, so they are invariant to a global rotation
+ translation of either structure; the pairwise matrices include i == j (the paper's
"all pairs"). Classification targets come from the true structure only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from esm3.model.geometry import backbone_frames
from esm3.model.vqvae.quality import lddt_ca

DISTANCE_CLAMP = 25.0  # squared Angstrom: an error beyond 5 A counts as 5 A
DIRECTION_CLAMP = 20.0
#: 63 distogram edges, 64 classes; a distance on an edge falls in the lower class
DISTOGRAM_EDGES = torch.linspace(2.3125, 21.6875, 63)
DIRECTION_BINS = 16
#: the pairs (p, q), p <= q, of the vectors CA->C, CA->N, normal whose dot products are binned
DIRECTION_PAIRS = ((0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2))
PLDDT_BINS = 50
#: 63 aligned-error edges (Angstrom), 64 classes; as the distogram, an edge is the lower class
PAE_EDGES = torch.linspace(0.0, 31.0, 63)
# ideal CB from N, CA, C (the coefficients AlphaFold / ProteinMPNN use)
_CB_A, _CB_B, _CB_C = -0.58273431, 0.56802827, -0.54067466


class LossTerm(NamedTuple):
    value: torch.Tensor  # 0-d float32: mean over valid pairs / positions (0 if none)
    count: torch.Tensor  # 0-d float32: number of valid pairs / positions


# ----------------------------------------------------------------------------- helpers


def _same_sample(sequence_id: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """(B, N, N) bool: both positions in one packed sample (all True without ids)."""
    if sequence_id is None:
        B, N = like.shape[:2]
        return torch.ones(B, N, N, dtype=torch.bool, device=like.device)
    return sequence_id[:, :, None] == sequence_id[:, None, :]


def _pair_mask(valid: torch.Tensor, sequence_id: torch.Tensor | None) -> torch.Tensor:
    """(B, N, N): both entries valid and in one sample. valid (B, N); ids (B, N) or None."""
    return valid[:, :, None] & valid[:, None, :] & _same_sample(sequence_id, valid)


def _masked_mean(values: torch.Tensor, valid: torch.Tensor) -> LossTerm:
    values = torch.where(valid, values, torch.zeros_like(values))
    count = valid.sum().float()
    return LossTerm(values.sum() / count.clamp(min=1), count)


def _clean(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """float32 coordinates, zero where not valid (NaN must not reach a gradient); valid
    covers x's leading dimensions (residues, or atoms)."""
    x = x.float()
    valid = valid.reshape(*valid.shape, *[1] * (x.dim() - valid.dim()))
    return torch.where(valid, x, torch.zeros_like(x))


def _distances(x: torch.Tensor) -> torch.Tensor:
    """(B, N, 3) -> (B, N, N) Euclidean distances; the floor keeps sqrt's gradient finite
    at coincident points."""
    sq = (x[:, :, None] - x[:, None]).pow(2).sum(-1)
    return sq.clamp(min=1e-10).sqrt()


def _dots(v: torch.Tensor) -> torch.Tensor:
    """(B, N, 3) -> (B, N, N) pairwise dot products."""
    return v @ v.transpose(-1, -2)


def _clamped_error(
    pred: torch.Tensor, true: torch.Tensor, valid: torch.Tensor, sid: torch.Tensor | None,
    pairwise: Callable[[torch.Tensor], torch.Tensor], clamp: float,
) -> LossTerm:  # fmt: skip
    """Mean of min((f(pred)_ij - f(true)_ij)^2, clamp) over valid pairs (same sample).
    pred, true (B, N, 3); valid (B, N); sid (B, N) or None; f = `pairwise`."""
    pred, true = _clean(pred, valid), _clean(true, valid)
    err = (pairwise(pred) - pairwise(true)).pow(2).clamp(max=clamp)
    return _masked_mean(err, _pair_mask(valid, sid))


def _per_atom(
    x: torch.Tensor, mask: torch.Tensor, sequence_id: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(B, L, A, 3) with a residue mask -> (B, L*A, 3), atom mask, atom sample ids."""
    B, L, A, _ = x.shape
    sid = None if sequence_id is None else sequence_id.repeat_interleave(A, dim=1)
    return x.reshape(B, L * A, 3), mask.repeat_interleave(A, dim=1), sid


def _ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-entry cross-entropy; logits (..., C), target (...) int64."""
    logp = logits.float().log_softmax(-1)
    return -logp.gather(-1, target[..., None]).squeeze(-1)


# ---------------------------------------------------------------------------- backbone


def backbone_distance_loss(
    pred: torch.Tensor, true: torch.Tensor, mask: torch.Tensor,
    sequence_id: torch.Tensor | None = None, clamp: float = DISTANCE_CLAMP,
) -> LossTerm:  # fmt: skip
    """Pairwise L2 distances among all N/CA/C atoms (3L x 3L), squared error clamped at
    25 A^2, mean over atom pairs of valid residues. pred, true (B, L, 3, 3)."""
    p, m, sid = _per_atom(pred, mask, sequence_id)
    t, _, _ = _per_atom(true, mask, sequence_id)
    return _clamped_error(p, t, m, sid, _distances, clamp)


def backbone_vectors(
    x: torch.Tensor, mask: torch.Tensor, sequence_id: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The 6 direction-loss vectors of each residue, (B, L, 6, 3), and their validity
    (B, L, 6): N->CA, CA->C, C->N(next), n_CA = -(N->CA x CA->C), n_N = C(prev)->N x N->CA,
    n_C = CA->C x C->N(next). A vector that needs a neighbour is valid only where that
    neighbour has coordinates and is in the same sample; chains of one sample must be
    separated by a position without coordinates (the chainbreak token) to not be bonded."""
    x = _clean(x, mask)
    n, ca, c = x.unbind(-2)
    L = mask.shape[1]
    sid = torch.zeros_like(mask, dtype=torch.long) if sequence_id is None else sequence_id
    index = torch.arange(L, device=mask.device)
    has_next = mask & mask.roll(-1, 1) & (sid == sid.roll(-1, 1)) & (index < L - 1)
    has_prev = mask & mask.roll(1, 1) & (sid == sid.roll(1, 1)) & (index > 0)
    n_ca, ca_c = ca - n, c - ca
    c_next = n.roll(-1, 1) - c  # C -> N of the next residue
    prev_n = n - c.roll(1, 1)  # C of the previous residue -> N
    vectors = [
        n_ca, ca_c, c_next, -torch.cross(n_ca, ca_c, dim=-1),
        torch.cross(prev_n, n_ca, dim=-1), torch.cross(ca_c, c_next, dim=-1),
    ]  # fmt: skip
    valid = [mask, mask, has_next, mask, has_prev, has_next]
    return torch.stack(vectors, dim=-2), torch.stack(valid, dim=-1)


def backbone_direction_loss(
    pred: torch.Tensor, true: torch.Tensor, mask: torch.Tensor,
    sequence_id: torch.Tensor | None = None, clamp: float = DIRECTION_CLAMP,
) -> LossTerm:  # fmt: skip
    """Pairwise dot products among all 6L backbone vectors (`backbone_vectors`), squared
    error clamped at 20, mean over pairs of valid vectors. pred, true (B, L, 3, 3).
    Validity (neighbours present) is decided on the true structure's mask."""
    B, L = mask.shape
    vp, valid = backbone_vectors(pred, mask, sequence_id)
    vt, _ = backbone_vectors(true, mask, sequence_id)
    sid = None if sequence_id is None else sequence_id.repeat_interleave(6, dim=1)
    flat = valid.reshape(B, L * 6)
    return _clamped_error(vp.reshape(B, L * 6, 3), vt.reshape(B, L * 6, 3), flat, sid, _dots, clamp)


# ------------------------------------------------------------------------------ binned


def ideal_cb(x: torch.Tensor) -> torch.Tensor:
    """Virtual CB (..., 3) from N/CA/C (..., 3, 3) with ideal geometry."""
    n, ca, c = x.unbind(-2)
    b, cc = ca - n, c - ca
    a = torch.cross(b, cc, dim=-1)
    return _CB_A * a + _CB_B * b + _CB_C * cc + ca


def distogram_bins(distances: torch.Tensor) -> torch.Tensor:
    """Class 0..63 of each distance: the number of edges strictly below it."""
    edges = DISTOGRAM_EDGES.to(distances.device, distances.dtype)
    return (distances[..., None] > edges).sum(-1)


def distogram_loss(
    logits: torch.Tensor, true: torch.Tensor, mask: torch.Tensor,
    sequence_id: torch.Tensor | None = None,
) -> LossTerm:  # fmt: skip
    """Cross-entropy of (B, L, L, 64) logits against the binned distances between the
    true structure's ideal CBs, mean over valid residue pairs. true (B, L, 3, 3)."""
    cb = ideal_cb(_clean(true, mask))
    target = distogram_bins(torch.cdist(cb, cb))
    return _masked_mean(_ce(logits, target), _pair_mask(mask, sequence_id))


def direction_bins(dots: torch.Tensor) -> torch.Tensor:
    """Class 0..15 of each dot product in [-1, 1]: 16 equal bins, 1 in the last."""
    return ((dots + 1) / 2 * DIRECTION_BINS).floor().long().clamp(0, DIRECTION_BINS - 1)


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=-1, keepdim=True).clamp(min=1e-8)


def direction_targets(true: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, L, L, 6) int64 classes of dot(v_p[i], v_q[j]) for the unit vectors CA->C,
    CA->N and their normal (CA->C x CA->N, normalised), over `DIRECTION_PAIRS`."""
    n, ca, c = _clean(true, mask).unbind(-2)
    ca_c, ca_n = _unit(c - ca), _unit(n - ca)
    v = torch.stack([ca_c, ca_n, _unit(torch.cross(ca_c, ca_n, dim=-1))], dim=-2)
    dots = torch.einsum("bipx,bjqx->bijpq", v, v)
    p, q = zip(*DIRECTION_PAIRS, strict=True)
    return direction_bins(dots[..., list(p), list(q)])


def direction_bins_loss(
    logits: torch.Tensor, true: torch.Tensor, mask: torch.Tensor,
    sequence_id: torch.Tensor | None = None,
) -> LossTerm:  # fmt: skip
    """Cross-entropy of (B, L, L, 6, 16) logits against `direction_targets`, mean over
    valid residue pairs and the 6 vector pairs."""
    ce = _ce(logits, direction_targets(true, mask))
    valid = _pair_mask(mask, sequence_id)[..., None].expand_as(ce)
    return _masked_mean(ce, valid)


def inverse_folding_loss(
    sequence_logits: torch.Tensor, sequence_targets: torch.Tensor, mask: torch.Tensor
) -> LossTerm:
    """Cross-entropy of (B, L, V) logits against (B, L) residue tokens where `mask`."""
    targets = torch.where(mask, sequence_targets, torch.zeros_like(sequence_targets))
    return _masked_mean(_ce(sequence_logits, targets), mask)


# ---------------------------------------------------------------------------- all atom


def compact_atoms(
    atom_mask: torch.Tensor, sequence_id: torch.Tensor | None, *coords: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor]]:
    """Only the present atoms, first-come, padded to the row with most: atom_mask
    (B, L, A), coords (B, L, A, k) -> valid (B, N), atom sample ids (B, N) or None,
    coords (B, N, k). N is ~8 L for proteins instead of 37 L, which keeps the N x N pair
    matrices of the all-atom losses small."""
    B, L, A = atom_mask.shape
    flat = atom_mask.reshape(B, L * A)
    N = max(int(flat.sum(1).max()), 1)
    order = torch.argsort((~flat).to(torch.int8), dim=1, stable=True)[:, :N]
    valid = flat.gather(1, order)
    sid = None
    if sequence_id is not None:
        sid = sequence_id.repeat_interleave(A, dim=1).gather(1, order)
    out = []
    for x in coords:
        x = x.reshape(B, L * A, -1)
        out.append(x.gather(1, order[..., None].expand(B, N, x.shape[-1])))
    return valid, sid, out


def all_atom_distance_loss(
    pred: torch.Tensor, true: torch.Tensor, atom_mask: torch.Tensor,
    sequence_id: torch.Tensor | None = None, clamp: float = DISTANCE_CLAMP,
) -> LossTerm:  # fmt: skip
    """The backbone distance loss over every present atom: pred, true (B, L, 37, 3);
    atom_mask (B, L, 37) bool (atoms with true coordinates)."""
    valid, sid, (p, t) = compact_atoms(atom_mask, sequence_id, pred, true)
    return _clamped_error(p, t, valid, sid, _distances, clamp)


def atom_normals(x: torch.Tensor, neighbours: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B, L, A, 3) normals (x_n1 - x_a) x (x_n2 - x_a) for each atom a and its two
    `neighbours` (B, L, A, 2) indices within the residue; zero where not `valid`.
    x must be finite (absent atoms zeroed)."""
    B, L, A, _ = x.shape
    idx = neighbours.reshape(B, L, A * 2, 1).expand(B, L, A * 2, 3)
    nb = x.gather(2, idx).reshape(B, L, A, 2, 3)
    normal = torch.cross(nb[..., 0, :] - x, nb[..., 1, :] - x, dim=-1)
    return torch.where(valid[..., None], normal, torch.zeros_like(normal))


def nearest_two(true: torch.Tensor, atom_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each atom, its two nearest present atoms of the same residue in the true
    structure: indices (B, L, A, 2) and validity (B, L, A) (present with two others)."""
    t = _clean(true, atom_mask)
    d = (t[..., :, None, :] - t[..., None, :, :]).norm(dim=-1)
    A = atom_mask.shape[-1]
    eye = torch.eye(A, dtype=torch.bool, device=atom_mask.device)
    usable = atom_mask[..., None, :] & ~eye
    d = torch.where(usable, d, torch.full_like(d, float("inf")))
    near, idx = d.topk(2, dim=-1, largest=False)
    return idx, atom_mask & torch.isfinite(near[..., 1])


def all_atom_direction_loss(
    pred: torch.Tensor, true: torch.Tensor, atom_mask: torch.Tensor,
    sequence_id: torch.Tensor | None = None, clamp: float = DIRECTION_CLAMP,
) -> LossTerm:  # fmt: skip
    """The direction loss generalised to every atom: each present atom's normal to the
    plane through it and its two nearest atoms of the residue (chosen in the true
    structure, the same atoms used for pred), pairwise dot products among all normals,
    squared error clamped at 20, mean over valid pairs."""
    idx, valid = nearest_two(true, atom_mask)
    pred, true = _clean(pred, atom_mask), _clean(true, atom_mask)
    np_, nt = atom_normals(pred, idx, valid), atom_normals(true, idx, valid)
    ok, sid, (p, t) = compact_atoms(valid, sequence_id, np_, nt)
    return _clamped_error(p, t, ok, sid, _dots, clamp)


def plddt_bins(lddt: torch.Tensor) -> torch.Tensor:
    """Class 0..49 of an lDDT in [0, 1]: 50 equal bins, 1 in the last."""
    return (lddt * PLDDT_BINS).floor().long().clamp(0, PLDDT_BINS - 1)


def plddt_loss(
    plddt_logits: torch.Tensor, pred: torch.Tensor, true: torch.Tensor, mask: torch.Tensor,
    sequence_id: torch.Tensor | None = None,
) -> LossTerm:  # fmt: skip
    """Cross-entropy of (B, L, 50) logits against the binned per-residue CA lDDT of the
    (detached) prediction; pred, true backbone (B, L, 3, 3) or atom37 (B, L, 37, 3).
    Residues with no neighbour within the cutoff do not count."""
    with torch.no_grad():
        score = lddt_ca(pred.detach(), true, mask, sequence_id=sequence_id, per_residue=True)
        ca = _clean(true[..., 1, :], mask)
        near = (torch.cdist(ca, ca) < 15.0) & _pair_mask(mask, sequence_id)
        has_pair = near.sum(-1) > 1  # itself and at least one other
    return _masked_mean(_ce(plddt_logits, plddt_bins(score)), mask & has_pair)


def aligned_errors(pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """(B, L, L) distance between CA_j seen from residue i's frame in the prediction and
    in the true structure (the error pAE predicts); frames from N/CA/C (B, L, 3, 3) as
    `esm3.model.geometry.backbone_frames` builds them, so a global move changes nothing."""

    def local(x: torch.Tensor) -> torch.Tensor:
        rot, ca, _ = backbone_frames(x)
        return torch.einsum("bixy,bijx->bijy", rot, ca[:, None] - ca[:, :, None])

    return (local(pred) - local(true)).norm(dim=-1)


def pae_bins(errors: torch.Tensor) -> torch.Tensor:
    """Class 0..63 of each aligned error: the number of edges strictly below it."""
    edges = PAE_EDGES.to(errors.device, errors.dtype)
    return (errors[..., None] > edges).sum(-1)


def pae_loss(
    pae_logits: torch.Tensor, pred: torch.Tensor, true: torch.Tensor, mask: torch.Tensor,
    sequence_id: torch.Tensor | None = None,
) -> LossTerm:  # fmt: skip
    """Cross-entropy of (B, L, L, 64) logits against the binned aligned errors of the
    (detached) predicted backbone (B, L, 3, 3), mean over valid residue pairs."""
    with torch.no_grad():
        target = pae_bins(aligned_errors(pred.detach().float(), true.float()))
    return _masked_mean(_ce(pae_logits, target), _pair_mask(mask, sequence_id))
