"""The vocabulary sizes of all tracks, which a model config is built from."""

from __future__ import annotations

from dataclasses import dataclass

from esm3.tokenize import sasa, sequence, ss8
from esm3.tokenize.annotations import FIRST_LABEL
from esm3.tokenize.function_tokens import FUNCTION_DEPTH, FUNCTION_VOCAB_SIZE
from esm3.tokenize.specials import (
    N_STRUCTURE_SPECIAL,
    PAD_SPECIALS,
    SEQUENCE_SPECIALS,
    TrackSpecials,
    structure_specials,
)
from esm3.tokenize.structure_tokens import DEFAULT_CODEBOOK_SIZE, structure_vocab_size

#: Categorical tracks in a fixed order (embedding, heads, losses and metrics use it).
CATEGORICAL_TRACKS = ("sequence", "structure", "ss8", "sasa", "function", "residue")


@dataclass(frozen=True)
class TrackSizes:
    """Token-id counts per track (specials included); the defaults are ESM3's (`esm`'s
    embedding sizes). function is per slot: 4 specials + 2^8 LSH tokens."""

    sequence: int = sequence.VOCAB_SIZE
    structure: int = structure_vocab_size(DEFAULT_CODEBOOK_SIZE)
    ss8: int = ss8.VOCAB_SIZE
    sasa: int = sasa.VOCAB_SIZE
    function: int = FUNCTION_VOCAB_SIZE
    residue: int = FIRST_LABEL + 1474  # specials + NONE + residue-annotation labels: 1478

    @classmethod
    def build(cls, codebook_size: int = DEFAULT_CODEBOOK_SIZE, n_residue: int = 1474) -> TrackSizes:
        return cls(structure=structure_vocab_size(codebook_size), residue=FIRST_LABEL + n_residue)

    @property
    def codebook_size(self) -> int:
        return self.structure - N_STRUCTURE_SPECIAL

    def specials(self, track: str) -> TrackSpecials:
        """The special ids of `track` (pad, mask, bos, eos, chainbreak)."""
        if track == "sequence":
            return SEQUENCE_SPECIALS
        if track == "structure":
            return structure_specials(self.codebook_size)
        return PAD_SPECIALS

    def head_outputs(self, track: str) -> int:
        """Logits per position of `track`'s output head, as `esm`'s heads: the structure
        head predicts codebook entries only; function gives 8 x 260 (one set per slot)."""
        if track == "structure":
            return self.codebook_size
        if track == "function":
            return FUNCTION_DEPTH * self.function
        return getattr(self, track)


class VocabularyMismatch(ValueError):
    """A model whose track sizes are not those of the tokenizer feeding it."""


def check_track_sizes(model: TrackSizes, tokenizer: TrackSizes, where: str = "model") -> None:
    """Refuse a model built for other vocabularies than the tokenizer's: one line naming
    each differing track and both sizes (token ids would index past an embedding, or a
    head would predict labels that are not the data's)."""
    diff = [
        f"{t}: {getattr(model, t)} token ids in the {where}, {getattr(tokenizer, t)} in the tokenizer"
        for t in CATEGORICAL_TRACKS
        if getattr(model, t) != getattr(tokenizer, t)
    ]
    if diff:
        raise VocabularyMismatch(
            f"{where} was built for other vocabularies ({'; '.join(diff)}); build it from the "
            "task config's track sizes (TaskConfig.track_sizes) or use the vocabulary it was "
            "trained with"
        )
