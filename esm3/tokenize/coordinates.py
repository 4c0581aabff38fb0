"""Backbone coordinates as a track: (L, 3, 3) float32, atoms N, CA, C, in Angstrom.

The track is continuous (no vocabulary): a residue is "given" when all three atoms are
finite. A residue with any NaN atom counts as having no coordinates (documented handling
of partly resolved residues); infinite values are an error.
"""

from __future__ import annotations

import numpy as np

BACKBONE_ATOMS = ("N", "CA", "C")


def validate_coordinates(
    coords: np.ndarray, length: int, *, record: str = ""
) -> tuple[np.ndarray, np.ndarray]:
    """Checked coordinates and their presence mask.

    Parameters: `coords` (L, 3, 3) Angstrom, NaN where missing; `length` the sequence length.
    Returns (coords float32 (L, 3, 3) with whole residues NaN where any atom is NaN,
    present bool (L,)). Raises ValueError naming the record on a wrong shape or inf.
    """
    where = f"record {record!r}: " if record else ""
    coords = np.asarray(coords, dtype=np.float32)
    if coords.shape != (length, 3, 3):
        raise ValueError(f"{where}coordinates have shape {coords.shape}, expected ({length}, 3, 3)")
    if np.isinf(coords).any():
        raise ValueError(f"{where}coordinates contain inf")
    present = np.isfinite(coords).all(axis=(1, 2))
    if not present.all():
        coords = np.where(present[:, None, None], coords, np.float32(np.nan))
    return coords, present
