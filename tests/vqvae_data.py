"""Real chains as atom37 arrays for the structure tokenizer's tests (MDAnalysisTests files
read with biotite, as tests.test_tasks_augment reads them)."""

from __future__ import annotations

from functools import cache

import numpy as np
import torch

from esm3.model.vqvae.atom37 import ATOM37_INDEX, N_ATOM37
from tests.realdata import mda_file
from tests.test_tasks_augment import _read

# CHARMM names: C-terminal oxygens OT1/OT2, isoleucine's CD
_ALIASES = {"OT1": "O", "OT2": "OXT", "O1": "O", "O2": "OXT"}
_ILE_ALIASES = {"CD": "CD1"}


@cache
def real_atom37(name: str, chain: int = 0) -> tuple[np.ndarray, np.ndarray, str]:
    """One chain: coordinates (L, 37, 3) float32 NaN where absent, atom mask (L, 37) and
    the one-letter sequence. Hydrogens and atoms outside atom37 are dropped."""
    import biotite.structure as struc
    from biotite.sequence import ProteinSequence

    atoms = _read(mda_file(name))
    atoms.res_name[np.isin(atoms.res_name, ["HSD", "HSE", "HSP"])] = "HIS"
    atoms = atoms[struc.filter_amino_acids(atoms) & ~atoms.hetero]
    atoms = atoms[atoms.chain_id == np.unique(atoms.chain_id)[chain]]
    starts = struc.get_residue_starts(atoms)
    residue = np.searchsorted(starts, np.arange(atoms.array_length()), side="right") - 1
    coords = np.full((len(starts), N_ATOM37, 3), np.nan, dtype=np.float32)
    for i, (atom, res) in enumerate(zip(atoms.atom_name, atoms.res_name, strict=True)):
        atom = _ALIASES.get(atom, atom)
        if res == "ILE":
            atom = _ILE_ALIASES.get(atom, atom)
        if atom in ATOM37_INDEX:
            coords[residue[i], ATOM37_INDEX[atom]] = atoms.coord[i]
    letters = []
    for r in atoms.res_name[starts]:
        try:
            letters.append(ProteinSequence.convert_letter_3to1(r))
        except KeyError:
            letters.append("X")
    return coords, np.isfinite(coords).all(-1), "".join(letters).upper()


def atom37_batch(name: str, chain: int = 0) -> tuple[torch.Tensor, torch.Tensor, str]:
    """`real_atom37` as (1, L, 37, 3) and (1, L, 37) tensors."""
    coords, mask, seq = real_atom37(name, chain)
    return torch.from_numpy(coords)[None], torch.from_numpy(mask)[None], seq
