"""Attention and linear-layer backends: torch everywhere, xformers / TransformerEngine on CUDA.

`resolve(cfg, device)` decides once what runs, logging one line per fallback (missing
library or no CUDA), and `describe` gives the start-up report. The GPU libraries are
imported lazily and only when asked for.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from esm3.model.config import BackendConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Backends:
    """The backends in use after fallbacks."""

    attention: str  # "sdpa" | "xformers"
    linear: str  # "torch" | "te"
    fp8: bool

    def describe(self) -> str:
        return f"attention={self.attention} linear={self.linear} fp8={self.fp8}"


def _import(name: str) -> Any | None:
    try:
        return __import__(name, fromlist=["_"])
    except Exception:  # ImportError, or a broken CUDA build raising at import
        return None


def resolve(cfg: BackendConfig, device: torch.device | str | None = None) -> Backends:
    """The backends that will run on `device` (default: CUDA if available), with fallbacks."""
    dev = torch.device(device) if device is not None else None
    cuda = (dev.type == "cuda") if dev is not None else torch.cuda.is_available()
    attention, linear, fp8 = cfg.attention, cfg.linear, cfg.fp8
    if attention == "xformers":
        if not cuda:
            log.warning("attention backend xformers needs CUDA; falling back to torch SDPA")
            attention = "sdpa"
        elif _import("xformers.ops") is None:
            log.warning("xformers is not installed; falling back to torch SDPA")
            attention = "sdpa"
    if linear == "te":
        if not cuda:
            log.warning("linear backend TransformerEngine needs CUDA; falling back to torch")
            linear = "torch"
        elif _import("transformer_engine.pytorch") is None:
            log.warning("transformer_engine is not installed; falling back to torch linear")
            linear = "torch"
    if fp8 and linear != "te":
        log.warning("FP8 needs the TransformerEngine linear backend; running without FP8")
        fp8 = False
    if fp8 and torch.cuda.get_device_capability()[0] < 9:
        log.warning("FP8 needs compute capability >= 9.0 (Hopper); running without FP8")
        fp8 = False
    return Backends(attention, linear, fp8)


def fp8_autocast(backends: Backends) -> contextlib.AbstractContextManager:
    """TransformerEngine's FP8 autocast (delayed scaling, HYBRID E4M3/E5M2) or a no-op."""
    if not backends.fp8:
        return contextlib.nullcontext()
    te = _import("transformer_engine.pytorch")
    recipe = _import("transformer_engine.common.recipe")
    return te.fp8_autocast(
        enabled=True,
        fp8_recipe=recipe.DelayedScaling(
            fp8_format=recipe.Format.HYBRID, amax_history_len=16, amax_compute_algo="max"
        ),
    )


def make_linear(d_in: int, d_out: int, backends: Backends, *, bias: bool = False) -> nn.Module:
    """nn.Linear or te.Linear (same math; TE adds FP8 support)."""
    if backends.linear == "te":
        te = _import("transformer_engine.pytorch")
        return te.Linear(d_in, d_out, bias=bias)
    return nn.Linear(d_in, d_out, bias=bias)


class SwiGLU(nn.Module):
    """Pre-LayerNorm SwiGLU feed-forward: W3 (silu(W1 ln(x)) * W2 ln(x)); (..., d) -> (..., d).
    `bias`: biases on both linears (`esm`'s structure encoder has them, ESM3's trunk not)."""

    def __init__(self, d_model: int, hidden: int, *, bias: bool = False) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.w12 = nn.Linear(d_model, 2 * hidden, bias=bias)
        self.w3 = nn.Linear(hidden, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.w12(self.norm(x)).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


def make_ffn(d_model: int, hidden: int, backends: Backends) -> nn.Module:
    """The block's LayerNorm + SwiGLU MLP: torch, or TE's fused LayerNormMLP."""
    if backends.linear == "te":
        te = _import("transformer_engine.pytorch")
        return te.LayerNormMLP(d_model, hidden, bias=False, activation="swiglu")
    return SwiGLU(d_model, hidden)


def attention_mask(sequence_id: torch.Tensor | None) -> torch.Tensor | None:
    """Boolean (B, 1, T, T) mask, True where query i may attend key j (same sequence).

    `sequence_id` (B, T): which packed sequence a position belongs to, -1 at padding
    (padding attends padding only, so no row is empty). None: everything attends everything.
    """
    if sequence_id is None:
        return None
    return (sequence_id[:, :, None] == sequence_id[:, None, :])[:, None]


def _seqlens(sequence_id: torch.Tensor) -> list[int]:
    """Lengths of the runs of equal ids along each row, rows concatenated (for xformers)."""
    B, T = sequence_id.shape
    change = torch.ones_like(sequence_id, dtype=torch.bool)
    change[:, 1:] = sequence_id[:, 1:] != sequence_id[:, :-1]
    starts = torch.nonzero(change.reshape(-1)).squeeze(1)
    ends = torch.cat([starts[1:], starts.new_tensor([B * T])])
    return (ends - starts).tolist()


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    backends: Backends,
    sequence_id: torch.Tensor | None,
    mask: torch.Tensor | None,
) -> torch.Tensor:
    """Softmax attention. q, k, v: (B, T, H, d_head) -> (B, T, H, d_head).

    Packed rows (contiguous runs of equal `sequence_id`) attend within their run only:
    via the dense boolean `mask` for SDPA, or a block-diagonal bias for xformers.
    """
    if backends.attention == "xformers":
        xops = _import("xformers.ops")
        B, T, H, D = q.shape
        if sequence_id is None:
            return xops.memory_efficient_attention(q, k, v)
        from xformers.ops.fmha.attn_bias import BlockDiagonalMask

        bias = BlockDiagonalMask.from_seqlens(_seqlens(sequence_id))
        out = xops.memory_efficient_attention(
            q.reshape(1, B * T, H, D), k.reshape(1, B * T, H, D), v.reshape(1, B * T, H, D), bias
        )
        return out.reshape(B, T, H, D)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask
    )
    return out.transpose(1, 2)


@torch.no_grad()
def max_logit(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Largest pre-softmax logit q.k / sqrt(d_head) over allowed pairs; a 0-d float32 tensor.

    Computed in chunks of heads so memory stays at about 2^26 logits.
    """
    B, T, H, D = q.shape
    qh = q.transpose(1, 2).float()
    kh = k.transpose(1, 2).float()
    step = max(1, (1 << 26) // max(1, B * T * T))
    best = torch.tensor(float("-inf"), device=q.device)
    for h in range(0, H, step):
        logits = qh[:, h : h + step] @ kh[:, h : h + step].transpose(-1, -2) / D**0.5
        if mask is not None:
            logits = logits.masked_fill(~mask, float("-inf"))
        best = torch.maximum(best, logits.amax())
    return best
