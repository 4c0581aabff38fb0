"""Solvent accessible surface area per residue: biotite's Shrake-Rupley, summed per residue."""

from __future__ import annotations

import biotite.structure as bs
import numpy as np


def residue_sasa(
    atoms: bs.AtomArray,
    complete: np.ndarray | None = None,
    probe_radius: float = 1.4,
    point_number: int = 1000,
) -> np.ndarray:
    """SASA in square Angstrom per residue of one chain, shape (L,) float32.

    Atom SASA comes from `biotite.structure.sasa` (ProtOr radii) on the isolated chain's
    heavy atoms, summed per residue (atoms without a radius count 0). Residues whose
    backbone is incomplete (`complete` is False, shape (L,)) get NaN: their coordinates
    are NaN in the record.
    """
    atom_sasa = bs.sasa(atoms, probe_radius=probe_radius, point_number=point_number)
    starts = bs.get_residue_starts(atoms)
    per_res = np.add.reduceat(np.nan_to_num(atom_sasa, nan=0.0), starts).astype(np.float32)
    if complete is not None:
        per_res[~np.asarray(complete, dtype=bool)] = np.nan
    return per_res
