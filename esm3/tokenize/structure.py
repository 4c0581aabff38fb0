"""Structure tokens: one discrete code per residue from its local backbone geometry.

How this differs from the paper. ESM3 tokenizes structure with a learned VQ-VAE: an
encoder with geometric attention over each residue's 16 nearest neighbours (in the
residue's own frame) produces a vector that is quantized against 4096 learned codes, and a
decoder is trained to rebuild all-atom coordinates from the codes. Here there is no neural
network and no decoder: each residue gets a fixed, hand-made feature vector of its
neighbourhood, expressed in its own N-CA-C frame, and the codebook is k-means over those
vectors (default 4096 codes). The tokens are therefore invariant to rotation and
translation like the paper's, and local like the paper's, but they are not trained to be
decodable back to coordinates, and nothing is learned end to end with the language model.
`StructureTokenizer` is the interface: a learned VQ-VAE that implements it can replace
`KMeansStructureTokenizer` without touching the data pipeline.

Features per residue i (all in i's frame, lengths in units of 10 Angstrom):
- sin and cos of the backbone dihedrals phi, psi, omega (0 where undefined);
- local coordinates of the CA of residues i-2, i-1, i+1, i+2, with a presence flag each;
- a soft occupancy of the neighbourhood: for each anchor point of a 3x3x3 grid (spacing
  6 Angstrom, centred on CA), sum over the other residues j (|i - j| > 2) of
  exp(-|x_j - anchor|^2 / (2 sigma^2)), sigma 3 Angstrom. It is continuous in the
  coordinates and does not depend on the order of neighbours, so numerical noise from a
  rotation cannot reorder anything.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Protocol, Self, runtime_checkable

import numpy as np

from esm3.data.structures.geometry import dihedrals, local_frames

NO_TOKEN = -1  # residue without a complete N-CA-C backbone
FORMAT_VERSION = 1


@runtime_checkable
class StructureTokenizer(Protocol):
    """What the data pipeline needs from a structure tokenizer."""

    @property
    def codebook_size(self) -> int: ...

    def fit(self, backbones: Iterable[np.ndarray]) -> Self:
        """Learn the codebook from training backbones, each (L, 3, 3) N/CA/C Angstrom."""
        ...

    def encode(self, backbone: np.ndarray) -> np.ndarray:
        """(L, 3, 3) -> (L,) int16 tokens in [0, codebook_size); NO_TOKEN where missing."""
        ...

    def save(self, path: str | Path) -> None: ...

    @classmethod
    def load(cls, path: str | Path) -> Self: ...


_SEQ_OFFSETS = (-2, -1, 1, 2)
_GRID = np.stack(np.meshgrid(*[np.array([-6.0, 0.0, 6.0])] * 3, indexing="ij"), -1).reshape(-1, 3)
_SIGMA = 3.0
_LENGTH_UNIT = 10.0
_CUTOFF = 26.0  # Angstrom
FEATURE_DIM = 6 + 4 * len(_SEQ_OFFSETS) + len(_GRID)


def _checked_backbone(backbone: np.ndarray) -> np.ndarray:
    bb = np.asarray(backbone, dtype=np.float64)
    if bb.ndim != 3 or bb.shape[1:] != (3, 3):
        raise ValueError(f"backbone must have shape (L, 3, 3), got {bb.shape}")
    return bb


def residue_features(backbone: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rotation/translation-invariant features of each residue's neighbourhood.

    backbone: (L, 3, 3) N/CA/C in Angstrom, NaN where missing.
    Returns features (M, FEATURE_DIM) float64 for the M residues with a complete backbone,
    and their indices (M,).
    """
    bb = _checked_backbone(backbone)
    L = len(bb)
    valid = ~np.isnan(bb).any(axis=(1, 2))
    idx = np.flatnonzero(valid)
    if len(idx) == 0:
        return np.zeros((0, FEATURE_DIM)), idx
    rot, origin = local_frames(bb[idx])  # (M, 3, 3), (M, 3)
    ca = bb[:, 1]
    ca_ok = ~np.isnan(ca).any(-1)

    ang = dihedrals(bb)[idx]  # (M, 3)
    ang_feat = np.concatenate([np.sin(ang), np.cos(ang)], axis=1)
    ang_feat = np.nan_to_num(ang_feat, nan=0.0)

    seq_feat = []
    for off in _SEQ_OFFSETS:
        j = idx + off
        ok = (j >= 0) & (j < L)
        ok[ok] &= ca_ok[j[ok]]
        local = np.zeros((len(idx), 3))
        jj = j[ok]
        local[ok] = np.einsum("mab,mb->ma", rot[ok], ca[jj] - origin[ok]) / _LENGTH_UNIT
        seq_feat += [local, ok[:, None].astype(np.float64)]

    # soft occupancy of grid anchors by non-local CAs (|i - j| > 2) within _CUTOFF, beyond
    # which a CA adds < 2e-6 to any anchor
    others = np.flatnonzero(ca_ok)
    d = np.linalg.norm(ca[idx][:, None, :] - ca[others][None, :, :], axis=-1)  # (M, n)
    near = (d < _CUTOFF) & (np.abs(idx[:, None] - others[None, :]) > 2)
    pi, pj = np.nonzero(near)  # sorted by pi
    local = np.einsum("pab,pb->pa", rot[pi], ca[others[pj]] - origin[pi])
    d2 = (local**2).sum(1)[:, None] - 2.0 * local @ _GRID.T + (_GRID**2).sum(1)[None, :]
    w = np.exp(-np.maximum(d2, 0.0) / (2 * _SIGMA**2))  # (P, 27)
    occ = np.zeros((len(idx), len(_GRID)))
    if len(pi):
        starts = np.flatnonzero(np.diff(pi, prepend=-1))
        occ[pi[starts]] = np.add.reduceat(w, starts, axis=0)
    feats = np.concatenate([ang_feat, *seq_feat, 0.5 * occ], axis=1)
    return feats, idx


def complete_residues(backbone: np.ndarray) -> int:
    """Number of residues with a complete N-CA-C backbone (those `residue_features` keeps)."""
    return int((~np.isnan(_checked_backbone(backbone)).any(axis=(1, 2))).sum())


def picked_features(backbones: Iterable[np.ndarray], picks: np.ndarray) -> np.ndarray:
    """Rows `picks` of the features of all complete residues of `backbones`, in turn.

    Equal to `np.concatenate([residue_features(bb)[0] for bb in backbones])[picks]`, but
    only the backbones holding a picked residue get their features computed, and only the
    picked rows are kept: memory follows len(picks), not the number of backbones.
    """
    order = np.argsort(picks, kind="stable")
    wanted = picks[order]
    x = np.empty((len(picks), FEATURE_DIM))
    start = 0  # index, among all complete residues, of this backbone's first one
    for bb in backbones:
        n = complete_residues(bb)
        lo, hi = np.searchsorted(wanted, [start, start + n])
        if hi > lo:
            x[order[lo:hi]] = residue_features(bb)[0][wanted[lo:hi] - start]
        start += n
    return x


class KMeansStructureTokenizer:
    """k-means codebook over `residue_features`; see the module docstring."""

    def __init__(
        self,
        codebook_size: int = 4096,
        iterations: int = 25,
        max_train_residues: int = 2_000_000,
        seed: int = 0,
    ) -> None:
        self._k = int(codebook_size)
        self.iterations = iterations
        self.max_train_residues = max_train_residues
        self.seed = seed
        self.centroids: np.ndarray | None = None  # (k, FEATURE_DIM) float64

    @property
    def codebook_size(self) -> int:
        return self._k

    def fit(self, backbones: Iterable[np.ndarray]) -> Self:
        """Learn the codebook from at most `max_train_residues` sampled residues.

        `backbones` is read twice, to count the complete residues and then to compute the
        features of the sampled ones only, so a collection that streams its backbones on
        each iteration (a shard reader) keeps memory at the sample's size; a one-shot
        iterator is listed first. The sample is drawn as if from the features of every
        residue in order, so the codebook does not depend on how the backbones arrive.
        """
        if iter(backbones) is backbones:
            backbones = list(backbones)
        total = sum(complete_residues(bb) for bb in backbones)
        if total < self._k:
            raise ValueError(
                f"{total} residues with a complete backbone; need >= codebook_size={self._k}"
            )
        rng = np.random.default_rng(self.seed)
        picks = np.arange(total)
        if total > self.max_train_residues:
            picks = rng.choice(total, self.max_train_residues, replace=False)
        x = picked_features(backbones, picks)
        self.centroids = _kmeans(x, self._k, self.iterations, rng)
        return self

    def encode(self, backbone: np.ndarray) -> np.ndarray:
        if self.centroids is None:
            raise RuntimeError("tokenizer has no codebook: call fit() or load() first")
        tokens = np.full(len(backbone), NO_TOKEN, dtype=np.int16)
        feats, idx = residue_features(backbone)
        if len(idx):
            tokens[idx] = _nearest(feats, self.centroids).astype(np.int16)
        return tokens

    def save(self, path: str | Path) -> None:
        if self.centroids is None:
            raise RuntimeError("nothing to save: the codebook is not fitted")
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp.npz")
        np.savez(
            tmp,
            centroids=self.centroids,
            version=np.int64(FORMAT_VERSION),
            feature_dim=np.int64(FEATURE_DIM),
            kind=np.str_("kmeans-local-frame"),
        )
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> Self:
        with np.load(Path(path)) as z:
            version = int(z["version"])
            if version != FORMAT_VERSION or int(z["feature_dim"]) != FEATURE_DIM:
                raise ValueError(
                    f"{path}: codebook format {version}/{int(z['feature_dim'])} does not match "
                    f"this code's {FORMAT_VERSION}/{FEATURE_DIM}; refit the codebook"
                )
            centroids = np.array(z["centroids"], dtype=np.float64)
        tok = cls(codebook_size=len(centroids))
        tok.centroids = centroids
        return tok


def _nearest(x: np.ndarray, centroids: np.ndarray, chunk: int = 8192) -> np.ndarray:
    c2 = (centroids**2).sum(1)
    out = np.empty(len(x), dtype=np.int64)
    for s in range(0, len(x), chunk):
        xs = x[s : s + chunk]
        out[s : s + chunk] = np.argmin(c2[None, :] - 2.0 * xs @ centroids.T, axis=1)
    return out


def _kmeans(x: np.ndarray, k: int, iterations: int, rng: np.random.Generator) -> np.ndarray:
    """Lloyd's k-means from k distinct random samples; empty clusters take the worst-fit points."""
    centroids = x[rng.choice(len(x), k, replace=False)].copy()
    for _ in range(iterations):
        assign = _nearest(x, centroids)
        counts = np.bincount(assign, minlength=k)
        sums = np.stack(
            [np.bincount(assign, weights=x[:, d], minlength=k) for d in range(x.shape[1])], 1
        )
        moved = centroids.copy()
        nonempty = counts > 0
        moved[nonempty] = sums[nonempty] / counts[nonempty, None]
        empty = np.flatnonzero(~nonempty)
        if len(empty):
            err = ((x - moved[assign]) ** 2).sum(1)
            moved[empty] = x[np.argsort(err)[::-1][: len(empty)]]
        if np.allclose(moved, centroids):
            centroids = moved
            break
        centroids = moved
    return centroids
