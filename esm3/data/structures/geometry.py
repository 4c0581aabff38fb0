"""Backbone geometry on (L, 3, 3) arrays of N, CA, C coordinates in Angstrom (NaN = missing)."""

from __future__ import annotations

import numpy as np


def long_range_contacts(
    backbone: np.ndarray, max_distance: float = 8.0, min_separation: int = 12
) -> int:
    """Number of residue pairs i < j with j - i > `min_separation` and CA-CA < `max_distance`.

    Residues without a CA are never in contact. backbone: (L, 3, 3), or (L, 3) CA only.
    """
    ca = backbone[:, 1] if backbone.ndim == 3 else backbone
    ca = np.asarray(ca, dtype=np.float64)
    n = len(ca)
    if n <= min_separation + 1:
        return 0
    d = np.sqrt(((ca[:, None, :] - ca[None, :, :]) ** 2).sum(-1))
    i, j = np.triu_indices(n, k=min_separation + 1)
    return int(np.count_nonzero(d[i, j] < max_distance))  # NaN compares False


def local_frames(backbone: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-residue frames from N, CA, C: rotations (L, 3, 3) and origins (L, 3) at CA.

    Rows of each rotation are the frame axes: e1 along CA->C, e2 in the N-CA-C plane
    towards N, e3 = e1 x e2. A point x in the global frame has local coordinates
    R @ (x - CA). NaN where the backbone is incomplete.
    """
    bb = np.asarray(backbone, dtype=np.float64)
    n, ca, c = bb[:, 0], bb[:, 1], bb[:, 2]
    e1 = c - ca
    e1 /= np.linalg.norm(e1, axis=-1, keepdims=True)
    u = n - ca
    e2 = u - (u * e1).sum(-1, keepdims=True) * e1
    e2 /= np.linalg.norm(e2, axis=-1, keepdims=True)
    e3 = np.cross(e1, e2)
    return np.stack([e1, e2, e3], axis=1), ca


def dihedrals(backbone: np.ndarray) -> np.ndarray:
    """Backbone dihedrals phi, psi, omega per residue in radians, shape (L, 3), NaN if undefined.

    phi_i = C(i-1)-N-CA-C, psi_i = N-CA-C-N(i+1), omega_i = CA-C-N(i+1)-CA(i+1).
    """
    bb = np.asarray(backbone, dtype=np.float64)
    L = len(bb)
    out = np.full((L, 3), np.nan)
    if L < 2:
        return out
    atoms = bb.reshape(-1, 3)  # N0 CA0 C0 N1 CA1 C1 ...
    tors = _torsion(atoms[:-3], atoms[1:-2], atoms[2:-1], atoms[3:])  # (3L - 3,)
    # torsion k is over atoms k..k+3; psi_i starts at N_i (3i), omega_i at CA_i (3i+1),
    # phi_{i+1} at C_i (3i+2)
    out[:-1, 1] = tors[0::3]
    out[:-1, 2] = tors[1::3]
    out[1:, 0] = tors[2::3]
    return out


def _torsion(a: np.ndarray, b: np.ndarray, c: np.ndarray, d: np.ndarray) -> np.ndarray:
    b0, b1, b2 = a - b, c - b, d - c
    b1n = b1 / np.linalg.norm(b1, axis=-1, keepdims=True)
    v = b0 - (b0 * b1n).sum(-1, keepdims=True) * b1n
    w = b2 - (b2 * b1n).sum(-1, keepdims=True) * b1n
    x = (v * w).sum(-1)
    y = (np.cross(b1n, v) * w).sum(-1)
    return np.arctan2(y, x)


def random_rigid(rng: np.random.Generator, scale: float = 50.0) -> tuple[np.ndarray, np.ndarray]:
    """A uniformly random rotation (3, 3) and a translation (3,) of up to `scale` Angstrom."""
    q = rng.normal(size=4)
    q /= np.linalg.norm(q)
    w, x, y, z = q
    rot = np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )
    return rot, rng.uniform(-scale, scale, size=3)
