"""The ESM3 multi-track masked transformer (model math only; no distributed code).

The architecture, inputs and token ids are those of EvolutionaryScale's `esm` ESM3, so
weights cross both ways (`esm3.interop.esm`): per-track embeddings and pLDDT projections
summed; pre-LN blocks with layer norm on queries and keys, rotary position embeddings,
SwiGLU feed-forward and branch outputs divided by sqrt(n_layers/36); geometric attention
over backbone frames in the first block (or alternating, for inverse folding); a final
LayerNorm without bias; one head per output track. `model.layers` is the per-block module list that an
FSDP / activation-checkpointing wrapper applies to from outside.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from esm3.model import backends as bk
from esm3.model.config import ModelConfig
from esm3.model.geometry import GeometricAttention, backbone_frames, geometric_bias
from esm3.tokenize.annotations import RESIDUE_DEPTH
from esm3.tokenize.function_tokens import FUNCTION_DEPTH
from esm3.tokenize.specials import PAD

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
    sequence_id_for_attention: torch.Tensor | None  # (B, T), None: attend everything
    rot: torch.Tensor | None = None
    trans: torch.Tensor | None = None
    present: torch.Tensor | None = None
    geo_bias: torch.Tensor | None = None


class Block(nn.Module):
    """One transformer block: kind "standard", "mixed" (+ geometric) or "geometric".
    Branch outputs are divided by sqrt(n_layers / 36) before they join the residual."""

    def __init__(self, cfg: ModelConfig, kind: str, backends: bk.Backends) -> None:
        super().__init__()
        self.kind = kind
        self.scale = cfg.residual_scale
        self.attn = SelfAttention(cfg, backends) if kind != "geometric" else None
        self.geom = (
            GeometricAttention(cfg.d_model, cfg.n_geom_heads) if kind != "standard" else None
        )
        self.ffn = bk.make_ffn(cfg.d_model, cfg.ffn_hidden, backends)

    def forward(self, x: torch.Tensor, ctx: _Context) -> torch.Tensor:
        if self.attn is not None:
            x = x + self.attn(x, ctx) / self.scale
        if self.geom is not None:
            x = x + self.geom(x, ctx.rot, ctx.trans, ctx.present, ctx.geo_bias) / self.scale
        return x + self.ffn(x) / self.scale


class Head(nn.Module):
    """Output head: Linear, GELU, LayerNorm, Linear (d_model -> n_out)."""

    def __init__(self, d_model: int, n_out: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(d_model, d_model), nn.GELU(), nn.LayerNorm(d_model), nn.Linear(d_model, n_out)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def plddt_rbf(values: torch.Tensor, n_bins: int = 16) -> torch.Tensor:
    """(...,) pLDDT on [0, 1] -> (..., n_bins) Gaussian radial basis over [0, 1] (esm's)."""
    centers = torch.linspace(0.0, 1.0, n_bins, device=values.device, dtype=values.dtype)
    z = (values[..., None] - centers) * n_bins
    return torch.exp(-(z**2))


class InputEmbedding(nn.Module):
    """The sum of every track's embedding (A.1.5, as `esm`): per-track tables; function
    tokens through 8 per-slot tables of width d/8, concatenated; residue annotations
    through a summed EmbeddingBag; pLDDT (average and per residue) through Linear(16, d)
    of a 16-bin RBF. Padding id 0 of the function and residue tables is a zero vector."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d, t = cfg.d_model, cfg.tracks
        if d % FUNCTION_DEPTH:
            raise ValueError(f"model.d_model {d} must be a multiple of {FUNCTION_DEPTH}")
        self.sequence = nn.Embedding(t.sequence, d)
        self.structure = nn.Embedding(t.structure, d)
        self.ss8 = nn.Embedding(t.ss8, d)
        self.sasa = nn.Embedding(t.sasa, d)
        self.function = nn.ModuleList(
            nn.Embedding(t.function, d // FUNCTION_DEPTH, padding_idx=PAD)
            for _ in range(FUNCTION_DEPTH)
        )
        self.residue = nn.EmbeddingBag(t.residue, d, mode="sum", padding_idx=PAD)
        self.average_plddt = nn.Linear(16, d)
        self.per_res_plddt = nn.Linear(16, d)

    def forward(self, tok: dict[str, torch.Tensor], average_plddt, per_res_plddt) -> torch.Tensor:
        x = self.sequence(tok["sequence"]) + self.structure(tok["structure"])
        # the RBFs in the tables' dtype: BF16 where FSDP's mixed precision casts the weights
        x = x + self.average_plddt(plddt_rbf(average_plddt).to(x.dtype)).expand_as(x)
        x = x + self.per_res_plddt(plddt_rbf(per_res_plddt).to(x.dtype))
        x = x + self.ss8(tok["ss8"]) + self.sasa(tok["sasa"])
        slots = tok["function"].unbind(-1)
        x = x + torch.cat([emb(s) for emb, s in zip(self.function, slots, strict=True)], -1)
        B, T, D = tok["residue"].shape
        return x + self.residue(tok["residue"].reshape(B * T, D)).view(B, T, -1)


@dataclass
class ESM3Output:
    """logits per head track: sequence/structure/ss8/sasa (B, T, V); function (B, T, 8, V);
    residue (B, T, V) (multi-label). embeddings: (B, T, d_model) after the final norm.
    max_attn_logit: (n_attention_layers,) float32, NaN where not tracked."""

    logits: dict[str, torch.Tensor]
    embeddings: torch.Tensor
    max_attn_logit: torch.Tensor


TRACK_INPUTS = ("sequence", "structure", "ss8", "sasa", "function", "residue")
_SLOTS = {"function": (FUNCTION_DEPTH,), "residue": (RESIDUE_DEPTH,)}  # tokens per residue


class ESM3(nn.Module):
    """The multi-track model. Construct with a ModelConfig; `backends` resolved at start-up."""

    def __init__(self, cfg: ModelConfig, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.backends = bk.resolve(cfg.backend, device)
        log.info("ESM3 %s: %s", cfg.name, self.backends.describe())
        d = cfg.d_model
        self.embed = InputEmbedding(cfg)
        self.layers = nn.ModuleList([Block(cfg, kind, self.backends) for kind in cfg.layer_kinds()])
        self.norm = nn.LayerNorm(d, bias=False)
        self.heads = nn.ModuleDict({t: Head(d, cfg.tracks.head_outputs(t)) for t in cfg.heads})
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.Embedding, nn.EmbeddingBag)):
                nn.init.normal_(m.weight, std=0.02)
                if m.padding_idx is not None:
                    with torch.no_grad():
                        m.weight[m.padding_idx].zero_()

    def filled_inputs(
        self, B: int, T: int, device: torch.device, tracks: dict[str, torch.Tensor | None]
    ) -> dict[str, torch.Tensor]:
        """Every track's tokens, an absent one filled as `esm` fills it: sequence and
        structure with their MASK, the others with `<pad>` (0); then, as `esm`, the
        structure track takes BOS/EOS/PAD/chainbreak wherever the sequence has them."""
        sizes = self.cfg.tracks
        out = {}
        for t in TRACK_INPUTS:
            tok = tracks.get(t)
            if tok is None:
                shape = (B, T, *_SLOTS.get(t, ()))
                tok = torch.full(shape, sizes.specials(t).mask, dtype=torch.long, device=device)
            out[t] = tok
        seq, st = sizes.specials("sequence"), sizes.specials("structure")
        s = out["structure"]
        for which in ("bos", "pad", "eos", "chainbreak"):
            s = s.masked_fill(out["sequence"] == getattr(seq, which), getattr(st, which))
        out["structure"] = s
        return out

    def forward(
        self,
        sequence: torch.Tensor | None = None,
        structure: torch.Tensor | None = None,
        ss8: torch.Tensor | None = None,
        sasa: torch.Tensor | None = None,
        function: torch.Tensor | None = None,
        residue: torch.Tensor | None = None,
        coords: torch.Tensor | None = None,
        chain_id: torch.Tensor | None = None,
        sequence_id: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        average_plddt: torch.Tensor | None = None,
        per_res_plddt: torch.Tensor | None = None,
        **_: object,
    ) -> ESM3Output:
        """Run the model.

        Token tracks (B, T) int64 (function (B, T, 8), residue (B, T, 16)) with `esm`'s ids;
        a track left None is "not given" and filled as `esm` does (`filled_inputs`).
        coords (B, T, 3, 3) Angstrom, NaN where not given (None: no structure).
        average_plddt (B,) or (B, T) and per_res_plddt (B, T) on [0, 1] (None: 1 and 0, esm's
        defaults). chain_id (B, T): geometric attention stays within a chain (None: one
        chain). sequence_id (B, T): attention stays within equal ids (packed rows; -1 at
        padding); None: every position attends every other, as in `esm`. positions (B, T):
        rotary positions (default: index within each run of equal sequence ids). Raises
        ValueError when T exceeds the context length or no track is given.
        """
        given = {"sequence": sequence, "structure": structure, "ss8": ss8, "sasa": sasa}
        given |= {"function": function, "residue": residue}
        ref = next((v for v in (*given.values(), coords) if v is not None), None)
        if ref is None:
            raise ValueError("ESM3.forward needs at least one track or coordinates")
        B, T = ref.shape[:2]
        device = ref.device
        if T > self.cfg.context_length:
            raise ValueError(
                f"input length {T} exceeds the model's context length {self.cfg.context_length}"
            )
        tok = self.filled_inputs(B, T, device, given)
        if positions is None:
            positions = _positions(sequence_id, B, T, device)
        ctx = _Context(positions, bk.attention_mask(sequence_id), sequence_id)
        if any(layer.geom is not None for layer in self.layers):
            if coords is None:
                coords = torch.full((B, T, 3, 3), float("nan"), device=device)
            ctx.rot, ctx.trans, ctx.present = backbone_frames(coords[..., :3, :])
            chains = chain_id if chain_id is not None else torch.zeros_like(tok["sequence"])
            ctx.geo_bias = geometric_bias(ctx.present, chains, sequence_id)
        avg = torch.ones(B, device=device) if average_plddt is None else average_plddt.float()
        avg = avg.view(B, 1) if avg.dim() == 1 else avg
        per_res = (
            torch.zeros(B, T, device=device) if per_res_plddt is None else per_res_plddt.float()
        )
        x = self.embed(tok, avg, per_res)
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
