"""Every probability and threshold of the pre-training recipe, with the paper's defaults."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

from esm3.tokenize.annotations import FIRST_LABEL, RESIDUE_DEPTH, AnnotationVocab
from esm3.tokenize.function_tokens import FunctionFiles, FunctionTokenizer
from esm3.tokenize.structure_tokens import DEFAULT_CODEBOOK_SIZE, structure_vocab_size
from esm3.tokenize.tracks import TrackSizes


@dataclass(frozen=True)
class TrackNoise:
    """Mask-rate schedule and whole-track dropout probability of one track (Table S6)."""

    schedule: str
    dropout: float


@dataclass
class TaskConfig:
    """The corruption recipe (paper A.2.2). Lengths count residues; distances in Angstrom."""

    # Table S6
    sequence: TrackNoise = TrackNoise("betalinear30", 0.0)
    structure: TrackNoise = TrackNoise("cosine", 0.25)
    coordinates: TrackNoise = TrackNoise("cubic", 0.5)
    ss8: TrackNoise = TrackNoise("square_root", 0.9)
    sasa: TrackNoise = TrackNoise("square_root", 0.9)
    function: TrackNoise = TrackNoise("square_root", 0.9)
    residue: TrackNoise = TrackNoise("square_root", 0.9)
    betalinear_beta_fraction: float = 0.8
    # coordinates
    span_drop_prob: float = 0.5  # span dropping instead of i.i.d. masking
    max_spans: int = 8  # number of masked spans drawn from 1..max_spans
    coord_noise_sd: float = 0.1  # Angstrom, on all input coordinates
    # atomic coordination sampling
    coordination_prob: float = 0.05
    coordination_contact: float = 6.0  # CA-CA below this
    coordination_min_sep: int = 10  # |i - j| at least this
    coordination_neighbor_prob: float = 0.5
    # tertiary interface sampling
    interface_prob: float = 0.05
    interface_contact: float = 8.0
    interface_min_sep: int = 24
    # residue gap augmentation
    gap_chain_p: float = 0.9  # number of chains ~ Geometric(gap_chain_p)
    gap_max_chains: int = 9
    gap_min: int = 10  # residues dropped between two chains, at least
    gap_dirichlet_alpha: float = 1.0
    # sample size: a protein of more than max_length - 2 residues becomes a random window
    # of max_length residues without BOS/EOS (A.1.3: their absence marks a fragment)
    max_length: int = 2048
    # function tokens (A.1.8): keywords, and whole annotations, dropped during training
    keyword_dropout: float = 0.15
    annotation_dropout: float = 0.15
    # vocabularies (training reads them from preprocessing's vocabulary file,
    # `data.vocabulary`; the model's embedding and head sizes follow from them).
    # function_files: the folder of the function token tables (ours or esm's file names,
    # `FunctionFiles.in_folder`); "": no function track.
    codebook_size: int = DEFAULT_CODEBOOK_SIZE
    function_files: str = ""
    residue_labels: tuple[str, ...] = ()
    # (site label, residue label) pairs from esm's residue table: with any, a site label
    # without one is <unk>, as in esm's tokenizer; () reads labels as they are
    residue_aliases: tuple[tuple[str, str], ...] = ()
    residue_vocab: AnnotationVocab = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("sequence", "structure", "coordinates", "ss8", "sasa", "function", "residue"):
            tn = getattr(self, name)
            if isinstance(tn, dict):
                tn = TrackNoise(**tn)
                setattr(self, name, tn)
            if not 0.0 <= tn.dropout <= 1.0:
                raise ValueError(f"tasks.{name}.dropout must be in [0, 1], got {tn.dropout}")
        for name in (
            "span_drop_prob",
            "coordination_prob",
            "coordination_neighbor_prob",
            "interface_prob",
            "betalinear_beta_fraction",
            "keyword_dropout",
            "annotation_dropout",
        ):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"tasks.{name} must be in [0, 1], got {v}")
        if not 0.0 < self.gap_chain_p <= 1.0:
            raise ValueError(f"tasks.gap_chain_p must be in (0, 1], got {self.gap_chain_p}")
        if self.max_length < 3:
            raise ValueError(f"tasks.max_length must be >= 3, got {self.max_length}")
        self.residue_vocab = AnnotationVocab(
            self.residue_labels, RESIDUE_DEPTH, self.residue_aliases
        )

    @property
    def function_tokenizer(self) -> FunctionTokenizer | None:
        """The function tokenizer of `function_files` (loaded once per process), or None."""
        return _function_tokenizer(str(self.function_files)) if self.function_files else None

    def track_sizes(self) -> TrackSizes:
        """Token-id counts of every track as this recipe's tokenizers write them: the one
        place a model's embedding and head sizes come from. A track without labels keeps
        one unused label id, so its head still has an output."""
        return TrackSizes(
            structure=structure_vocab_size(self.codebook_size),
            residue=max(self.residue_vocab.size, FIRST_LABEL + 1),
        )


@lru_cache(maxsize=4)
def _function_tokenizer(folder: str) -> FunctionTokenizer:
    """Tables read once per process (a worker re-reads them: they stay out of pickles)."""
    return FunctionTokenizer.from_files(FunctionFiles.in_folder(folder))
