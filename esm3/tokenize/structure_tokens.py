"""Vocabulary of the structure-token track (the codebook itself lives in `structure.py`).

As `esm`: codebook index c (0 <= c < codebook_size) is token c, and the five specials
follow (`esm3.tokenize.specials.structure_specials`); -1 in a sample (no coordinates for
that residue) becomes MASK: the residue's structure is "not given" and never a target.
"""

from __future__ import annotations

import numpy as np

from esm3.tokenize.specials import N_STRUCTURE_SPECIAL, structure_specials

DEFAULT_CODEBOOK_SIZE = 4096


def structure_vocab_size(codebook_size: int = DEFAULT_CODEBOOK_SIZE) -> int:
    """Number of token ids of the structure track: codebook entries + specials."""
    return codebook_size + N_STRUCTURE_SPECIAL


def encode_structure_tokens(
    codes: np.ndarray, codebook_size: int = DEFAULT_CODEBOOK_SIZE, *, record: str = ""
) -> np.ndarray:
    """Track tokens from codebook indices, shape (L,) -> (L,), int64; -1 -> MASK.

    Raises ValueError for indices outside [-1, codebook_size).
    """
    codes = np.asarray(codes, dtype=np.int64)
    if codes.size and (codes.min() < -1 or codes.max() >= codebook_size):
        where = f"record {record!r}: " if record else ""
        raise ValueError(
            f"{where}structure token out of range [-1, {codebook_size}): "
            f"min {codes.min()}, max {codes.max()}"
        )
    return np.where(codes < 0, structure_specials(codebook_size).mask, codes)
