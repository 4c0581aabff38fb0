"""Shapes of the structure tokenizer's VQ-VAE (paper A.1.7) and its training stages.

The encoder preset is the released `esm` StructureTokenEncoder (d 1024, 2 geometric
blocks of 128 heads, 16 neighbours, relative positions clamped at +-32, Linear(1024->128),
4,096 x 128 codes). Stage 1 trains encoder, codebook and a small backbone decoder (the
paper: 8 blocks of width 1024); stage 2 freezes encoder and codebook and trains a large
all-atom decoder (`esm`'s released decoder: 30 blocks of width 1280, 20 heads).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any


@dataclass(frozen=True)
class EncoderConfig:
    d_model: int = 1024
    n_layers: int = 2
    geom_heads: int = 128
    knn: int = 16  # neighbours by CA distance, the residue itself first
    rel_pos_bins: int = 32  # relative sequence positions clamped to +-32
    d_code: int = 128  # pre-quantisation projection
    n_codes: int = 4096
    ema_decay: float = 0.99
    restart_threshold: float = 1.0  # a code whose EMA count falls below this is dead
    commitment: float = 0.25  # beta of the commitment loss


@dataclass(frozen=True)
class DecoderConfig:
    d_model: int = 1024
    n_layers: int = 8
    n_heads: int = 16
    all_atom: bool = False  # stage 2: predicts all heavy atoms (atom37), not just N/CA/C
    inverse_folding: bool = True  # a sequence head trained with cross-entropy (stage 1)
    pair_dim: int = 128  # width of the pairwise head (esm's: 128)


@dataclass(frozen=True)
class VQVAEConfig:
    name: str = "custom"
    stage: int = 1  # 1: encoder + codebook + decoder; 2: encoder and codebook frozen
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    context_length: int = 512
    # squared errors beyond these count as these (the paper: 5 A squared; 20)
    distance_clamp: float = 25.0
    direction_clamp: float = 20.0
    # weights of the stage's losses (the paper sums them)
    loss_weights: dict[str, float] = field(
        default_factory=lambda: {
            "distance": 1.0,
            "direction": 1.0,
            "distogram": 1.0,
            "direction_bins": 1.0,
            "inverse_folding": 1.0,
            "commitment": 1.0,
            # stage 2
            "all_atom_distance": 1.0,
            "all_atom_direction": 1.0,
            "plddt": 1.0,
            "pae": 1.0,
        }
    )

    def __post_init__(self) -> None:
        if self.stage not in (1, 2):
            raise ValueError(f"vqvae stage must be 1 or 2, got {self.stage}")
        if self.stage == 2 and not self.decoder.all_atom:
            raise ValueError("the stage-2 decoder predicts all atoms: set decoder.all_atom")

    def fingerprint(self) -> dict[str, Any]:
        """What a checkpoint must match to load: the kind, the stage and every shape."""
        training_only = ("ema_decay", "restart_threshold", "commitment")
        enc = {k: v for k, v in asdict(self.encoder).items() if k not in training_only}
        return {"kind": "vqvae", "stage": self.stage, "encoder": enc,
                "decoder": asdict(self.decoder)}  # fmt: skip


PRESETS: dict[str, VQVAEConfig] = {
    "vqvae_stage1": VQVAEConfig(name="vqvae_stage1"),
    "vqvae_stage2": VQVAEConfig(
        name="vqvae_stage2",
        stage=2,
        decoder=DecoderConfig(
            d_model=1280, n_layers=30, n_heads=20, all_atom=True, inverse_folding=False
        ),
    ),
    # a CPU-sized model for tests and the demo: same structure, small widths
    "vqvae_tiny": VQVAEConfig(
        name="vqvae_tiny",
        encoder=EncoderConfig(d_model=64, n_layers=2, geom_heads=8, d_code=16, n_codes=64),
        decoder=DecoderConfig(d_model=64, n_layers=2, n_heads=4),
        context_length=128,
    ),
}


def vqvae_config(preset: str, **overrides: Any) -> VQVAEConfig:
    """A preset with overrides; `encoder`/`decoder` overrides are dicts of their fields."""
    if preset not in PRESETS:
        raise ValueError(f"unknown vqvae preset {preset!r}; known: {', '.join(sorted(PRESETS))}")
    cfg = PRESETS[preset]
    enc = replace(cfg.encoder, **overrides.pop("encoder", {}))
    dec = replace(cfg.decoder, **overrides.pop("decoder", {}))
    return replace(cfg, encoder=enc, decoder=dec, **overrides)
