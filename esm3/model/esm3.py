"""The ESM3-style multi-track masked transformer (model math only; no distributed code).

Per-track embeddings are summed; pre-LN blocks with layer norm on queries and keys, rotary
position embeddings, SwiGLU feed-forward and branch outputs scaled by 1/sqrt(n_layers/36);
geometric attention over backbone frames in the first block (or alternating, for inverse
folding); one head per output track. `model.layers` is the per-block module list that an
FSDP / activation-checkpointing wrapper applies to from outside.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from esm3.model import backends as bk
from esm3.model.config import ModelConfig, _head_outputs
from esm3.model.geometry import GeometricAttention, backbone_frames, geometric_mask
from esm3.tokenize.annotations import FUNCTION_DEPTH
from esm3.tokenize.specials import MASK, N_SPECIAL, PAD

log = logging.getLogger(__name__)


def rotary(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotary position embedding (rotate-half form). x (B, T, H, D); positions (B, T)."""
    D = x.shape[-1]
    inv = 1.0 / base ** (torch.arange(0, D, 2, device=x.device, dtype=torch.float32) / D)
    ang = positions.float()[..., None] * inv  # (B, T, D/2)
    cos = torch.cat([ang.cos(), ang.cos()], -1)[:, :, None].to(x.dtype)
    sin = torch.cat([ang.sin(), ang.sin()], -1)[:, :, None].to(x.dtype)
    x1, x2 = x[..., : D // 2], x[..., D // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin


class SelfAttention(nn.Module):
    """Pre-LN multi-head self-attention with LayerNorm on queries and keys and rotary."""

    def __init__(self, cfg: ModelConfig, backends: bk.Backends) -> None:
        super().__init__()
        d = cfg.d_model
        self.n_heads, self.d_head = cfg.n_heads, cfg.d_head
        self.backends = backends
        self.norm = nn.LayerNorm(d)
        self.qkv = bk.make_linear(d, 3 * d, backends)
        self.q_norm = nn.LayerNorm(d, bias=False)
        self.k_norm = nn.LayerNorm(d, bias=False)
        self.out = bk.make_linear(d, d, backends)
        self.track_max_logit = cfg.track_max_logit
        self.last_max_logit: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, ctx: _Context) -> torch.Tensor:
        B, T, d = x.shape
        q, k, v = self.qkv(self.norm(x)).chunk(3, dim=-1)
        q, k = self.q_norm(q), self.k_norm(k)
        shape = (B, T, self.n_heads, self.d_head)
        q = rotary(q.reshape(shape), ctx.positions)
        k = rotary(k.reshape(shape), ctx.positions)
        v = v.reshape(shape)
        if self.track_max_logit:
            self.last_max_logit = bk.max_logit(q, k, ctx.attn_mask)
        y = bk.attend(q, k, v, self.backends, ctx.sequence_id_for_attention, ctx.attn_mask)
        return self.out(y.reshape(B, T, d))


@dataclass
class _Context:
    """Per-forward tensors shared by all blocks."""

    positions: torch.Tensor  # (B, T) rotary positions
    attn_mask: torch.Tensor | None  # (B, 1, T, T) bool or None
    sequence_id_for_attention: torch.Tensor | None  # (B, T), None when unpacked
    rot: torch.Tensor | None = None
    trans: torch.Tensor | None = None
    geo_mask: torch.Tensor | None = None


class Block(nn.Module):
    """One transformer block: kind "standard", "mixed" (+ geometric) or "geometric"."""

    def __init__(self, cfg: ModelConfig, kind: str, backends: bk.Backends) -> None:
        super().__init__()
        self.kind = kind
        self.scale = 1.0 / cfg.residual_scale
        self.attn = SelfAttention(cfg, backends) if kind != "geometric" else None
        self.geom = (
            GeometricAttention(cfg.d_model, cfg.n_geom_heads) if kind != "standard" else None
        )
        self.ffn = bk.make_ffn(cfg.d_model, cfg.ffn_hidden, backends)

    def forward(self, x: torch.Tensor, ctx: _Context) -> torch.Tensor:
        if self.attn is not None:
            x = x + self.scale * self.attn(x, ctx)
        if self.geom is not None:
            x = x + self.scale * self.geom(x, ctx.rot, ctx.trans, ctx.geo_mask)
        return x + self.scale * self.ffn(x)


class Head(nn.Module):
    """Output head: Linear, GELU, LayerNorm, Linear (d_model -> n_out)."""

    def __init__(self, d_model: int, n_out: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(d_model, d_model), nn.GELU(), nn.LayerNorm(d_model), nn.Linear(d_model, n_out)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@dataclass
class ESM3Output:
    """logits per head track: sequence/structure/ss8/sasa (B, T, V); function (B, T, 8, V);
    residue (B, T, n_labels) (multi-label). embeddings: (B, T, d_model) after the final norm.
    max_attn_logit: (n_attention_layers,) float32, NaN where not tracked."""

    logits: dict[str, torch.Tensor]
    embeddings: torch.Tensor
    max_attn_logit: torch.Tensor


TRACK_INPUTS = ("sequence", "structure", "ss8", "sasa", "function", "residue")


class ESM3(nn.Module):
    """The multi-track model. Construct with a ModelConfig; `backends` resolved at start-up."""

    def __init__(self, cfg: ModelConfig, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.backends = bk.resolve(cfg.backend, device)
        log.info("ESM3 %s: %s", cfg.name, self.backends.describe())
        d = cfg.d_model
        self.embed = nn.ModuleDict(
            {t: nn.Embedding(getattr(cfg.tracks, t), d) for t in TRACK_INPUTS}
        )
        self.layers = nn.ModuleList([Block(cfg, kind, self.backends) for kind in cfg.layer_kinds()])
        self.norm = nn.LayerNorm(d)
        self.heads = nn.ModuleDict({t: Head(d, _head_outputs(cfg, t)) for t in cfg.heads})
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)

    def _embed(self, tracks: dict[str, torch.Tensor]) -> torch.Tensor:
        seq = tracks["sequence"]
        x = self.embed["sequence"](seq)
        # a missing track is "not given": MASK at residues, the sequence's specials elsewhere
        missing = torch.where((seq < N_SPECIAL) & (seq != MASK), seq, torch.full_like(seq, MASK))
        for t in TRACK_INPUTS[1:]:
            tok = tracks.get(t)
            w = self.embed[t].weight
            if t in ("function", "residue"):
                if tok is None:
                    x = x + F.embedding(missing, w) * (FUNCTION_DEPTH if t == "function" else 16)
                else:
                    B, T, D = tok.shape
                    x = x + F.embedding_bag(tok.reshape(B * T, D), w, mode="sum").view(B, T, -1)
            else:
                x = x + F.embedding(missing if tok is None else tok, w)
        return x

    def forward(
        self,
        sequence: torch.Tensor,
        structure: torch.Tensor | None = None,
        ss8: torch.Tensor | None = None,
        sasa: torch.Tensor | None = None,
        function: torch.Tensor | None = None,
        residue: torch.Tensor | None = None,
        coords: torch.Tensor | None = None,
        chain_id: torch.Tensor | None = None,
        sequence_id: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        **_: object,
    ) -> ESM3Output:
        """Run the model.

        Token tracks (B, T) int64 (function (B, T, 8), residue (B, T, 16)); a track left
        None is "not given" (MASK). coords (B, T, 3, 3) Angstrom, NaN where not given
        (None: no structure). chain_id (B, T): geometric attention stays within a chain.
        sequence_id (B, T): packed sequences (-1 at padding); None: one sequence per row,
        padding (PAD tokens) excluded. positions (B, T): rotary positions (default: index
        within each packed sequence). Raises ValueError when T exceeds the context length.
        """
        B, T = sequence.shape
        if T > self.cfg.context_length:
            raise ValueError(
                f"input length {T} exceeds the model's context length {self.cfg.context_length}"
            )
        packed = sequence_id is not None
        if sequence_id is None:
            pad = sequence == PAD
            sequence_id = torch.where(pad, -1, 0) if bool(pad.any()) else None
        if positions is None:
            positions = _positions(sequence_id, B, T, sequence.device)
        mask = bk.attention_mask(sequence_id)
        ctx = _Context(positions, mask, sequence_id if (packed or mask is not None) else None)
        if any(layer.geom is not None for layer in self.layers):
            if coords is None:
                coords = torch.full((B, T, 3, 3), float("nan"), device=sequence.device)
            ctx.rot, ctx.trans, present = backbone_frames(coords)
            ctx.geo_mask = geometric_mask(present, chain_id, sequence_id)

        tracks = {"sequence": sequence, "structure": structure, "ss8": ss8, "sasa": sasa}
        tracks |= {"function": function, "residue": residue}
        x = self._embed({k: v for k, v in tracks.items() if v is not None})
        with bk.fp8_autocast(self.backends):
            for layer in self.layers:
                x = layer(x, ctx)
        x = self.norm(x)
        logits = {t: head(x) for t, head in self.heads.items()}
        if "function" in logits:
            logits["function"] = logits["function"].view(B, T, FUNCTION_DEPTH, -1)
        maxes = [
            (
                layer.attn.last_max_logit
                if layer.attn.last_max_logit is not None
                else torch.tensor(float("nan"))
            )
            for layer in self.layers
            if layer.attn is not None
        ]
        max_logit = torch.stack([m.to(x.device) for m in maxes]) if maxes else torch.empty(0)
        return ESM3Output(logits=logits, embeddings=x, max_attn_logit=max_logit)


def _positions(
    sequence_id: torch.Tensor | None, B: int, T: int, device: torch.device
) -> torch.Tensor:
    """Index of each position within its run of equal sequence ids (0..T-1 when None)."""
    ar = torch.arange(T, device=device).expand(B, T)
    if sequence_id is None:
        return ar
    start = torch.ones(B, T, dtype=torch.bool, device=device)
    start[:, 1:] = sequence_id[:, 1:] != sequence_id[:, :-1]
    run_start = torch.cummax(torch.where(start, ar, torch.zeros_like(ar)), dim=1).values
    return ar - run_start
