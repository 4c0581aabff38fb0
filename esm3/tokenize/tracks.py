"""The vocabulary sizes of all tracks, which a model config is built from."""

from __future__ import annotations

from dataclasses import dataclass

from esm3.tokenize import sasa, sequence, ss8
from esm3.tokenize.annotations import FIRST_LABEL
from esm3.tokenize.structure_tokens import DEFAULT_CODEBOOK_SIZE, structure_vocab_size

#: Categorical tracks in a fixed order (embedding, heads, losses and metrics use it).
CATEGORICAL_TRACKS = ("sequence", "structure", "ss8", "sasa", "function", "residue")


@dataclass(frozen=True)
class TrackSizes:
    """Token-id counts per track (specials included)."""

    sequence: int = sequence.VOCAB_SIZE
    structure: int = structure_vocab_size(DEFAULT_CODEBOOK_SIZE)
    ss8: int = ss8.VOCAB_SIZE
    sasa: int = sasa.VOCAB_SIZE
    function: int = FIRST_LABEL + 256  # specials + NONE + labels of the function vocabulary
    residue: int = FIRST_LABEL + 1478  # specials + NONE + residue-annotation labels

    @classmethod
    def build(
        cls,
        codebook_size: int = DEFAULT_CODEBOOK_SIZE,
        n_function: int = 256,
        n_residue: int = 1478,
    ) -> TrackSizes:
        return cls(
            structure=structure_vocab_size(codebook_size),
            function=FIRST_LABEL + n_function,
            residue=FIRST_LABEL + n_residue,
        )


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
