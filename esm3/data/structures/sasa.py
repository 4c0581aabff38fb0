"""Solvent accessible surface area per residue: biotite's Shrake-Rupley, summed per residue."""

from __future__ import annotations

from functools import cache

import biotite.structure as bs
import biotite.structure.info as info
import numpy as np


@cache
def _radius(res_name: str, atom_name: str, element: str) -> float:
    """ProtOr radius (Angstrom) as biotite uses it; for atoms ProtOr does not know (an atom
    name not in the residue's CCD entry) the element's single-atom radius; NaN if none."""
    try:
        r = info.vdw_radius_protor(res_name, atom_name)
    except (KeyError, ValueError):
        r = None
    if r is None:
        r = info.vdw_radius_single(element)
    return float("nan") if r is None else float(r)


def residue_sasa(
    atoms: bs.AtomArray,
    complete: np.ndarray | None = None,
    probe_radius: float = 1.4,
    point_number: int = 1000,
) -> np.ndarray:
    """SASA in square Angstrom per residue of one chain, shape (L,) float32.

    Atom SASA comes from `biotite.structure.sasa` (ProtOr radii) on the isolated chain's
    heavy atoms, summed per residue. Atoms ProtOr does not know (misnamed atoms in a
    damaged file) get their element's radius instead of failing the chain. Residues whose
    backbone is incomplete (`complete` is False, shape (L,)) get NaN: their coordinates
    are NaN in the record.
    """
    radii = np.array(
        [_radius(*k) for k in zip(atoms.res_name, atoms.atom_name, atoms.element, strict=True)]
    )
    known = np.isfinite(radii)  # atoms without any radius are left out entirely
    atom_sasa = bs.sasa(
        atoms,
        probe_radius=probe_radius,
        atom_filter=known,
        point_number=point_number,
        vdw_radii=np.where(known, radii, 0.0),
    )
    starts = bs.get_residue_starts(atoms)
    per_res = np.add.reduceat(np.nan_to_num(atom_sasa, nan=0.0), starts).astype(np.float32)
    if complete is not None:
        per_res[~np.asarray(complete, dtype=bool)] = np.nan
    return per_res
