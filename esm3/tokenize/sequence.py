"""Amino-acid sequence vocabulary: 20 standard residues, X B U Z O, and the specials."""

from __future__ import annotations

import numpy as np

from esm3.tokenize.specials import CHAINBREAK, N_SPECIAL, SPECIAL_NAMES

#: Order of the 20 standard amino acids followed by the ambiguous/rare codes.
AMINO_ACIDS = "LAGVSERTIDPKQNFYMHWC"
EXTRA_CODES = "XBUZO"
LETTERS = AMINO_ACIDS + EXTRA_CODES
#: In a sequence string, "|" marks a chainbreak (a gap between chains).
CHAINBREAK_CHAR = "|"

VOCAB: tuple[str, ...] = SPECIAL_NAMES + tuple(LETTERS)
VOCAB_SIZE = len(VOCAB)
X_TOKEN = N_SPECIAL + LETTERS.index("X")

_LUT = np.full(256, -1, dtype=np.int64)
for _i, _c in enumerate(LETTERS):
    _LUT[ord(_c)] = N_SPECIAL + _i
_LUT[ord(CHAINBREAK_CHAR)] = CHAINBREAK


def encode_sequence(sequence: str, *, unknown: str = "error", record: str = "") -> np.ndarray:
    """Tokens of an amino-acid string (no bos/eos), shape (L,), int64.

    Upper-case one-letter codes only; "|" becomes the chainbreak token.
    `unknown="error"` raises ValueError naming the record, position and letter of the
    first letter outside the vocabulary; `unknown="X"` maps such letters to X.
    """
    raw = np.frombuffer(sequence.encode("latin-1", errors="replace"), dtype=np.uint8)
    tokens = _LUT[raw]
    bad = np.flatnonzero(tokens < 0)
    if bad.size:
        if unknown == "X":
            tokens[bad] = X_TOKEN
        else:
            where = f"record {record!r}: " if record else ""
            i = int(bad[0])
            raise ValueError(
                f"{where}unknown amino-acid letter {sequence[i]!r} at position {i + 1} "
                f"({bad.size} unknown in total; allowed: {LETTERS}{CHAINBREAK_CHAR})"
            )
    return tokens


def decode_sequence(tokens: np.ndarray) -> str:
    """Inverse of `encode_sequence` for value and chainbreak tokens; other specials -> '?'."""
    out = []
    for t in np.asarray(tokens).tolist():
        if t == CHAINBREAK:
            out.append(CHAINBREAK_CHAR)
        elif t >= N_SPECIAL:
            out.append(LETTERS[t - N_SPECIAL])
        else:
            out.append("?")
    return "".join(out)
