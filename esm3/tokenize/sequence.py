"""Amino-acid sequence vocabulary: `esm`'s, 20 standard residues, X B U Z O, and specials.

Ids (as `esm`): `<cls>` 0 (the sample's BOS), `<pad>` 1, `<eos>` 2, `<unk>` 3, the letters
`LAGVSERTIDPKQNFYMHWCXBUZO` 4..28, `.` 29, `-` 30, `|` 31 (chainbreak), `<mask>` 32; the
embedding and the output head have 64 rows (ids 33..63 unused), as ESM3's.
"""

from __future__ import annotations

import numpy as np

from esm3.tokenize.specials import SEQUENCE_CHAINBREAK

#: Order of the 20 standard amino acids followed by the ambiguous/rare codes.
AMINO_ACIDS = "LAGVSERTIDPKQNFYMHWC"
EXTRA_CODES = "XBUZO"
LETTERS = AMINO_ACIDS + EXTRA_CODES
FIRST_LETTER = 4
#: In a sequence string, "|" marks a chainbreak (a gap between chains).
CHAINBREAK_CHAR = "|"

VOCAB: tuple[str, ...] = (
    ("<cls>", "<pad>", "<eos>", "<unk>") + tuple(LETTERS) + (".", "-", "|", "<mask>")
)
VOCAB_SIZE = 64  # embedding rows and head outputs (esm pads its 33 tokens to 64)
X_TOKEN = FIRST_LETTER + LETTERS.index("X")

_LUT = np.full(256, -1, dtype=np.int64)
for _i, _c in enumerate(LETTERS):
    _LUT[ord(_c)] = FIRST_LETTER + _i
_LUT[ord(CHAINBREAK_CHAR)] = SEQUENCE_CHAINBREAK


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
    """Inverse of `encode_sequence` for letter and chainbreak tokens; other ids -> '?'."""
    out = []
    for t in np.asarray(tokens).tolist():
        if t == SEQUENCE_CHAINBREAK:
            out.append(CHAINBREAK_CHAR)
        elif FIRST_LETTER <= t < FIRST_LETTER + len(LETTERS):
            out.append(LETTERS[t - FIRST_LETTER])
        else:
            out.append("?")
    return "".join(out)
