"""Sequences generated for structures by the inverse folding model (paper A.2.1).

The model sees the backbone (all residues shown, sequence all MASK, as in training) and
its sequence head gives per-residue distributions; each generated sequence samples every
residue independently from them, restricted to the 20 standard amino acids, at a given
temperature. The output rows (id, dataset, sample, sequence) are what the ESM3 loader's
50/50 rule reads (`DatasetSpec.inverse_folded`).
"""

from __future__ import annotations

import numpy as np
import torch

from esm3.model.esm3 import ESM3
from esm3.tasks.config import TaskConfig
from esm3.tasks.corrupt import inverse_folding_corrupt
from esm3.tasks.sample import Protein
from esm3.tokenize.sequence import AMINO_ACIDS
from esm3.tokenize.specials import N_SPECIAL

#: Sequences per structure by dataset (the paper: 5 for AFDB and ESMAtlas, 64 for PDB).
DEFAULT_PER_STRUCTURE = {"afdb": 5, "esmatlas": 5, "pdb": 64}

_AA_TOKENS = np.array([N_SPECIAL + i for i in range(len(AMINO_ACIDS))])


@torch.no_grad()
def generate_sequences(
    model: ESM3,
    protein: Protein,
    n: int,
    rng: np.random.Generator,
    task: TaskConfig,
    temperature: float = 1.0,
) -> list[str]:
    """`n` sequences for the protein's structure; each has the protein's length.

    Proteins longer than the task's max_length - 2 are cropped by the task to a window;
    positions outside it keep the original residues. Raises ValueError without coordinates.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    inputs, _, _ = inverse_folding_corrupt(protein, rng, task)
    index = inputs.pop("residue_index")
    dev = next(model.parameters()).device
    batch = {k: torch.from_numpy(np.ascontiguousarray(v))[None].to(dev) for k, v in inputs.items()}
    logits = model(**batch).logits["sequence"][0].float()  # (T, V)
    aa = logits[:, torch.from_numpy(_AA_TOKENS).to(dev)] / temperature
    probs = torch.softmax(aa, dim=-1).cpu().numpy().astype(np.float64)
    res = np.flatnonzero(index >= 0)
    out = []
    letters = np.array(list(AMINO_ACIDS))
    base = np.array(list(protein.sequence))
    for _ in range(n):
        u = rng.random(len(res))[:, None]
        cum = np.cumsum(probs[res], axis=1)
        pick = np.minimum((u > cum / cum[:, -1:]).sum(axis=1), len(AMINO_ACIDS) - 1)
        seq = base.copy()
        seq[index[res]] = letters[pick]
        out.append("".join(seq))
    return out
