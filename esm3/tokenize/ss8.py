"""Eight-class secondary structure (DSSP) vocabulary, `esm`'s: `<pad>` 0, `<motif>` 1,
`<unk>` 2, then `GHITEBSC` 3..10.

DSSP 4 also writes ' ' (no assignment) and 'P' (polyproline II); both map to 'C' (coil),
as the paper's vocabulary has neither. '-' or '?' mean "unknown": `<pad>`, no target.
"""

from __future__ import annotations

import numpy as np

from esm3.tokenize.specials import N_SHARED_SPECIAL, PAD, SHARED_SPECIAL_NAMES

SS8_CLASSES = "GHITEBSC"
VOCAB: tuple[str, ...] = SHARED_SPECIAL_NAMES + tuple(SS8_CLASSES)
VOCAB_SIZE = len(VOCAB)

_LUT = np.full(256, -1, dtype=np.int64)
for _i, _c in enumerate(SS8_CLASSES):
    _LUT[ord(_c)] = N_SHARED_SPECIAL + _i
_LUT[ord(" ")] = _LUT[ord("P")] = N_SHARED_SPECIAL + SS8_CLASSES.index("C")
_LUT[ord("-")] = _LUT[ord("?")] = PAD


def encode_ss8(ss8: str, *, record: str = "") -> np.ndarray:
    """Tokens of a DSSP string, shape (L,), int64. Raises ValueError on other letters."""
    tokens = _LUT[np.frombuffer(ss8.encode("latin-1", errors="replace"), dtype=np.uint8)]
    bad = np.flatnonzero(tokens < 0)
    if bad.size:
        where = f"record {record!r}: " if record else ""
        i = int(bad[0])
        raise ValueError(f"{where}unknown SS8 letter {ss8[i]!r} at position {i + 1}")
    return tokens
