"""Solvent-accessible surface area vocabulary, `esm`'s: `<pad>` 0, `<motif>` 1, `<unk>` 2,
then 16 bins over per-residue SASA in Angstrom^2 (ids 3..18).

The 15 bin edges (absolute per-residue SASA from Shrake-Rupley) are ESM3's; as `esm`
(torch.bucketize), bin k holds EDGES[k-1] < v <= EDGES[k] (bin 0: v <= 0.8, bin 15:
v > 151.4). A NaN (no coordinates) is `<pad>`: not given, and not a target.
"""

from __future__ import annotations

import numpy as np

from esm3.tokenize.specials import N_SHARED_SPECIAL, PAD, SHARED_SPECIAL_NAMES

SASA_EDGES = np.array(
    [0.8, 4.0, 9.6, 16.4, 24.5, 32.9, 42.0, 51.5, 61.2, 70.9, 81.6, 93.3, 107.2, 125.4, 151.4]
)
N_BINS = len(SASA_EDGES) + 1
SASA_NAN = PAD  # token of "SASA unknown" (NaN)
FIRST_BIN = N_SHARED_SPECIAL
VOCAB: tuple[str, ...] = SHARED_SPECIAL_NAMES + tuple(f"sasa_bin_{k}" for k in range(N_BINS))
VOCAB_SIZE = len(VOCAB)


def encode_sasa(sasa: np.ndarray, *, record: str = "") -> np.ndarray:
    """Tokens of per-residue SASA (Angstrom^2), shape (L,) -> (L,), int64; NaN -> SASA_NAN.

    Raises ValueError on negative or infinite values.
    """
    sasa = np.asarray(sasa, dtype=np.float64)
    finite = np.isfinite(sasa)
    if np.any(np.isinf(sasa)) or np.any(sasa[finite] < 0):
        where = f"record {record!r}: " if record else ""
        raise ValueError(f"{where}SASA must be >= 0 Angstrom^2 or NaN (got negative or inf)")
    bins = np.searchsorted(SASA_EDGES, np.where(finite, sasa, 0.0), side="left")
    return np.where(finite, FIRST_BIN + bins, SASA_NAN)
