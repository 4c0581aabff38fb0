"""The special token ids of every track, as EvolutionaryScale's `esm` numbers them.

Each track has its own vocabulary and its own specials, so the same token tensors mean the
same thing here and in `esm`:
- sequence: `<cls>` (BOS) 0, `<pad>` 1, `<eos>` 2, `<unk>` 3, letters 4..28, `|` 31,
  `<mask>` 32 (64 embedding rows);
- structure: codebook indices 0..C-1 as themselves, then MASK C, EOS C+1, BOS C+2, PAD C+3,
  CHAINBREAK C+4 (C = codebook size, 4096 in ESM3);
- SS8, SASA, function, residue annotations: `<pad>` 0, `<motif>` 1, `<unk>` 2 first; they
  have no BOS/EOS/chainbreak/mask of their own: all of those are `<pad>` (0), which their
  embeddings treat as "not given" (esm fills an absent track the same way).
"""

from __future__ import annotations

from dataclasses import dataclass

SEQUENCE_BOS, SEQUENCE_PAD, SEQUENCE_EOS, SEQUENCE_UNK = 0, 1, 2, 3
SEQUENCE_CHAINBREAK, SEQUENCE_MASK = 31, 32
#: ss8/sasa/function/residue: `<pad>`, `<motif>`, `<unk>`; function/residue add `<none>`
PAD, MOTIF, UNK = 0, 1, 2
N_SHARED_SPECIAL = 3
NONE = 3  # function and residue annotations: "no annotation covers this residue"
SHARED_SPECIAL_NAMES: tuple[str, ...] = ("<pad>", "<motif>", "<unk>")
N_STRUCTURE_SPECIAL = 5


@dataclass(frozen=True)
class TrackSpecials:
    """The special ids of one track: what batching pads with (`pad`), what a corrupted or
    not-given position holds (`mask`), and what stands at a sample's start, end and chain
    gaps (`bos`, `eos`, `chainbreak`)."""

    pad: int
    mask: int
    bos: int
    eos: int
    chainbreak: int


SEQUENCE_SPECIALS = TrackSpecials(
    pad=SEQUENCE_PAD, mask=SEQUENCE_MASK, bos=SEQUENCE_BOS, eos=SEQUENCE_EOS,
    chainbreak=SEQUENCE_CHAINBREAK,
)  # fmt: skip
#: SS8, SASA, function and residue annotations
PAD_SPECIALS = TrackSpecials(pad=PAD, mask=PAD, bos=PAD, eos=PAD, chainbreak=PAD)


def structure_specials(codebook_size: int) -> TrackSpecials:
    """The structure track's specials, after the codebook."""
    c = codebook_size
    return TrackSpecials(pad=c + 3, mask=c, bos=c + 2, eos=c + 1, chainbreak=c + 4)
