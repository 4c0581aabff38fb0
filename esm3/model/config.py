"""Model configurations: the paper's sizes (Table S1), a tiny CPU model, a ~100M benchmark
model and the 200M inverse folding model; parameter and FLOP counts."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from esm3.tokenize.tracks import CATEGORICAL_TRACKS, TrackSizes


@dataclass(frozen=True)
class BackendConfig:
    """Which kernels to use. Unavailable choices fall back to torch with one log line.

    attention: "sdpa" (torch scaled_dot_product_attention, CPU and GPU) or "xformers"
      (memory_efficient_attention, block-diagonal mask for packed rows; CUDA only).
    linear: "torch" (nn.Linear / nn.LayerNorm) or "te" (TransformerEngine Linear and
      LayerNormMLP; CUDA only).
    fp8: run the trunk under TransformerEngine's fp8_autocast (needs linear="te", Hopper).
    """

    attention: str = "sdpa"
    linear: str = "torch"
    fp8: bool = False

    def __post_init__(self) -> None:
        if self.attention not in ("sdpa", "xformers"):
            raise ValueError(
                f"model.backend.attention must be sdpa or xformers, got {self.attention!r}"
            )
        if self.linear not in ("torch", "te"):
            raise ValueError(f"model.backend.linear must be torch or te, got {self.linear!r}")


@dataclass(frozen=True)
class ModelConfig:
    """An ESM3-style multi-track transformer.

    Layer kinds: "mixed" (self-attention + geometric attention + FFN; ESM3's first block),
    "standard" (self-attention + FFN) and "geometric" (geometric attention + FFN; the
    inverse folding model alternates geometric and standard blocks).
    """

    name: str = "custom"
    d_model: int = 128
    n_layers: int = 4
    d_head: int = 32
    context_length: int = 2048
    ffn_ratio: float = 8 / 3  # SwiGLU hidden = ffn_ratio * d_model, rounded up to ffn_multiple
    ffn_multiple: int = 64
    geom_heads: int = 0  # geometric ("v") heads; 0: d_model // 64, at least 4
    layer_pattern: str = "esm3"  # "esm3": first block mixed; "alternating": geometric/standard
    tracks: TrackSizes = field(default_factory=TrackSizes)
    heads: tuple[str, ...] = CATEGORICAL_TRACKS  # output heads (loss tracks)
    backend: BackendConfig = field(default_factory=BackendConfig)
    track_max_logit: bool = True  # report max pre-softmax attention logit per layer
    # divide branch outputs by sqrt(n_layers / 36) (ESM3); False: 1 (esm's VQ-VAE decoder)
    scale_residue: bool = True

    def __post_init__(self) -> None:
        if self.d_model % self.d_head:
            raise ValueError(
                f"model.d_model {self.d_model} is not a multiple of d_head {self.d_head}"
            )
        if self.layer_pattern not in ("esm3", "alternating"):
            raise ValueError(
                f"model.layer_pattern must be esm3 or alternating, got {self.layer_pattern!r}"
            )
        unknown = set(self.heads) - set(CATEGORICAL_TRACKS)
        if unknown:
            raise ValueError(f"model.heads has unknown tracks {sorted(unknown)}")

    @property
    def n_heads(self) -> int:
        return self.d_model // self.d_head

    @property
    def n_geom_heads(self) -> int:
        return self.geom_heads or max(4, self.d_model // 64)

    @property
    def ffn_hidden(self) -> int:
        h = int(self.ffn_ratio * self.d_model)
        return -(-h // self.ffn_multiple) * self.ffn_multiple

    @property
    def residual_scale(self) -> float:
        """Branch outputs are divided by this: sqrt(n_layers / 36), ESM3's depth scaling,
        or 1 without `scale_residue`."""
        return math.sqrt(self.n_layers / 36) if self.scale_residue else 1.0

    def layer_kinds(self) -> list[str]:
        if self.layer_pattern == "alternating":
            return ["geometric" if i % 2 == 0 else "standard" for i in range(self.n_layers)]
        return ["mixed"] + ["standard"] * (self.n_layers - 1)


PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(
        name="tiny", d_model=128, n_layers=4, d_head=32, tracks=TrackSizes.build(4096, 64)
    ),
    "bench_100m": ModelConfig(
        name="bench_100m", d_model=768, n_layers=12, d_head=64, ffn_multiple=256
    ),
    # 256 geometric heads: esm's open 1.4B model (esm3-sm-open-v1). The paper gives no
    # count for 7.7B and 98.5B; they keep the 1.4B's ratio, d_model / 6, rounded to a
    # multiple of 64 (448, 1024): the layer is one block of many, so its cost stays small.
    "esm3_1.4b": ModelConfig(
        name="esm3_1.4b", d_model=1536, n_layers=48, d_head=64, ffn_multiple=256, geom_heads=256
    ),
    "esm3_7.7b": ModelConfig(
        name="esm3_7.7b", d_model=2560, n_layers=96, d_head=64, ffn_multiple=256, geom_heads=448
    ),
    "esm3_98.5b": ModelConfig(
        name="esm3_98.5b",
        d_model=6144,
        n_layers=216,
        d_head=128,
        ffn_multiple=256,
        geom_heads=1024,
    ),  # fmt: skip
    "inverse_folding_200m": ModelConfig(
        name="inverse_folding_200m",
        d_model=1024,
        n_layers=18,
        d_head=64,
        ffn_multiple=256,
        layer_pattern="alternating",
        heads=("sequence",),
    ),
}


def preset(name: str, **overrides: object) -> ModelConfig:
    """A preset by name, with fields replaced by `overrides`."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}")
    return replace(PRESETS[name], **overrides)  # type: ignore[arg-type]


def embedding_params(cfg: ModelConfig) -> int:
    """Parameters of the embedding tables (lookups, no FLOPs): every track's rows x width
    (the 8 function tables are d/8 wide each)."""
    t = cfg.tracks
    return cfg.d_model * (t.sequence + t.structure + t.ss8 + t.sasa + t.function + t.residue)


def param_count(cfg: ModelConfig, *, embeddings: bool = True) -> int:
    """Parameter count from the config alone (matches `sum(p.numel())` of the torch model)."""
    d, h, g = cfg.d_model, cfg.ffn_hidden, cfg.n_geom_heads
    attn = 2 * d + d * 3 * d + d * d + 2 * d  # pre-LN weight+bias, qkv, out, q/k LN weights
    geo = d + d * g * 15 + g * 3 * d + 2 * g  # LN weight, projection, output, 2 weights/head
    ffn = 2 * d + d * 2 * h + h * d
    per_kind = {"standard": attn + ffn, "mixed": attn + geo + ffn, "geometric": geo + ffn}
    trunk = sum(per_kind[k] for k in cfg.layer_kinds()) + d  # final LN (no bias)
    if not embeddings:
        return trunk
    plddt = 2 * (16 * d + d)
    heads = 0
    for t in cfg.heads:
        out = cfg.tracks.head_outputs(t)
        heads += d * d + d + 2 * d + d * out + out
    return trunk + embedding_params(cfg) + plddt + heads


def flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> float:
    """Training FLOPs per token (forward + backward): 6 N + 12 n_layers d_model T.

    N counts the matmul parameters of the trunk and heads (embedding lookups are free);
    the second term is attention's scores and weighted sum (PaLM's estimate, used for MFU).
    """
    T = seq_len or cfg.context_length
    n = param_count(cfg, embeddings=True) - embedding_params(cfg)
    return 6.0 * n + 12.0 * cfg.n_layers * cfg.d_model * T
