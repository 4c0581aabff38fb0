"""Sequences generated for structures by the inverse folding model (paper A.2.1).

The model sees the backbone (all residues shown, sequence all MASK, as in training) and
its sequence head gives per-residue distributions; each generated sequence samples every
residue independently from them, restricted to the 20 standard amino acids, at a given
temperature. The output rows (id, dataset, sample, sequence) are what the ESM3 loader's
50/50 rule reads (`DatasetSpec.inverse_folded`).
"""

from __future__ import annotations

import zlib
from dataclasses import replace
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from esm3.model.esm3 import ESM3
from esm3.tasks.config import TaskConfig
from esm3.tasks.corrupt import inverse_folding_corrupt
from esm3.tasks.sample import Protein
from esm3.tokenize.sequence import AMINO_ACIDS, FIRST_LETTER
from esm3.train import checkpoint as ckpt

#: Sequences per structure by dataset (the paper: 5 for AFDB and ESMAtlas, 64 for PDB).
DEFAULT_PER_STRUCTURE = {"afdb": 5, "esmatlas": 5, "pdb": 64}

#: The rows of generated sequences, what `DatasetSpec.inverse_folded` files hold.
GENERATED_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("dataset", pa.string()),
        ("sample", pa.int32()),
        ("sequence", pa.string()),
    ]
)

_AA_TOKENS = np.array([FIRST_LETTER + i for i in range(len(AMINO_ACIDS))])


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


def load_model(model_cfg: Any, checkpoint: str, seed: int = 0) -> ESM3:
    """The inverse folding model of a checkpoint on CPU, in eval mode; CheckpointMismatch
    when the checkpoint is of another model."""
    ckpt.check_compatible(ckpt.read_state(checkpoint), ckpt.fingerprint(model_cfg), checkpoint)
    torch.manual_seed(seed)
    model = ESM3(model_cfg, device="cpu")
    ckpt.load(checkpoint, model, None)
    model.eval()
    return model


def generate_table(
    model: ESM3,
    records: list[dict[str, Any]],
    dataset: str,
    n: int,
    task: TaskConfig,
    *,
    seed: int = 0,
    temperature: float = 1.0,
) -> tuple[pa.Table, int]:
    """`n` sequences per record with coordinates (GENERATED_SCHEMA rows), and the number
    of records skipped for having none. Each protein draws from (seed, its id), so a
    record generates the same sequences in any shard or task."""
    task = replace(task, max_length=model.cfg.context_length)  # longer chains: a window
    rows, no_coords = [], 0
    for rec in records:
        if rec.get("coords") is None:
            no_coords += 1
            continue
        p = Protein.from_record(rec)
        rng = np.random.default_rng([seed, zlib.crc32(p.id.encode())])
        for i, seq in enumerate(generate_sequences(model, p, n, rng, task, temperature)):
            rows.append({"id": p.id, "dataset": dataset, "sample": i, "sequence": seq})
    return pa.Table.from_pylist(rows, schema=GENERATED_SCHEMA), no_coords
