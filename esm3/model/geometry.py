"""Geometric attention (A.1.6): attention over residues from their backbone frames, with
`esm`'s parameter layout and math, so its weights load unchanged.

Each residue with coordinates gets a frame (R, t) from N, CA, C by Gram-Schmidt: x along
C->CA, y in the N-CA-C plane, z = x cross y; t = CA (as `esm`, after AlphaFold). Per head
a residue's features give local 3-vectors: a rotation query/key and a value (rotated into
the global frame) and a distance query/key (rotated and translated). A pair scores
  softplus(w_rot) <R_i qr_i, R_j kr_j> / sqrt(3) - softplus(w_dist) |T_i qd_i - T_j kd_j| / sqrt(3),
which a global rotation + translation leaves unchanged; values are summed in the global
frame and rotated back into the query's frame, so the output is invariant too.
Keys without coordinates and pairs across chains are masked; a residue without
coordinates gets zero output (in ESM3's trunk; the structure encoder keeps it, as `esm`).
As `esm`, pairs of one packed sequence get +1 on their score rather than a mask: the
suite's batches give each packed sequence its own chain ids, so sequences never mix.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

_MAX_COORD = 1e6  # as esm: coordinates beyond this count as missing


def _unit(v: torch.Tensor, eps: float) -> torch.Tensor:
    return v / torch.sqrt((v * v).sum(-1, keepdim=True) + eps)


def backbone_frames(
    coords: torch.Tensor, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Frames from backbone atoms.

    coords: (..., 3, 3) Angstrom (atoms N, CA, C), NaN where not given; frames are computed
    in `dtype` (float32 as `esm`; float64 where exactness matters, e.g. invariance tests).
    Returns (rotations (..., 3, 3) with the frame axes as columns, translations (..., 3)
    = CA, present (...) bool). Missing residues get the identity frame at the origin.
    """
    finite = torch.isfinite(coords) & (coords < _MAX_COORD)
    present = finite.all(dim=-1).all(dim=-1)
    x = torch.where(present[..., None, None], coords, torch.zeros_like(coords)).to(dtype)
    n, ca, c = x[..., 0, :], x[..., 1, :], x[..., 2, :]
    e1 = _unit(ca - c, 1e-10)
    u = n - ca
    e2 = _unit(u - (e1 * u).sum(-1, keepdim=True) * e1, 1e-10)
    e3 = torch.cross(e1, e2, dim=-1)
    rot = torch.stack([e1, e2, e3], dim=-1)
    eye = torch.eye(3, device=coords.device, dtype=rot.dtype).expand_as(rot)
    rot = torch.where(present[..., None, None], rot, eye)
    return rot, torch.where(present[..., None], ca, torch.zeros_like(ca)), present


def geometric_bias(
    present: torch.Tensor, chain_id: torch.Tensor, sequence_id: torch.Tensor | None
) -> torch.Tensor:
    """(B, 1, T, T) float32 bias added to the geometric scores, as `esm` builds it: +1 within
    a packed sequence, the float32 minimum for keys without coordinates and across chains."""
    B, T = present.shape
    if sequence_id is None:
        bias = present.new_ones((B, T, T), dtype=torch.float32)
    else:
        bias = (sequence_id[:, :, None] == sequence_id[:, None, :]).float()
    lowest = torch.finfo(torch.float32).min
    bias = bias.masked_fill(~present[:, None, :], lowest)
    bias = bias.masked_fill(chain_id[:, :, None] != chain_id[:, None, :], lowest)
    return bias[:, None]


def _linear_in(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """`layer` applied in x's dtype: FSDP's mixed precision hands the module BF16 weights,
    while geometric attention computes in float32 (or float64)."""
    bias = None if layer.bias is None else layer.bias.to(x.dtype)
    return F.linear(x, layer.weight.to(x.dtype), bias)


class GeometricAttention(nn.Module):
    """Pre-LN geometric self-attention; (B, T, d) -> (B, T, d). Runs in float32 (float64
    when given float64).

    `proj` gives, per residue, 3-vectors in this order: rotation queries, rotation keys and
    values (n_heads each), then distance queries and keys (n_heads each). `bias`: biases on
    the norm and both linears (`esm`'s structure encoder has them, ESM3's trunk not);
    `zero_frameless`: zero the output of residues without a frame (ESM3's trunk does, the
    encoder not: there a frameless residue is never a key, so its state reaches nothing)."""

    def __init__(
        self, d_model: int, n_heads: int, *, bias: bool = False, zero_frameless: bool = True
    ) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.zero_frameless = zero_frameless
        self.norm = nn.LayerNorm(d_model, bias=bias)
        self.proj = nn.Linear(d_model, n_heads * 15, bias=bias)
        self.out = nn.Linear(n_heads * 3, d_model, bias=bias)
        self.dist_weight = nn.Parameter(torch.zeros(n_heads))
        self.rot_weight = nn.Parameter(torch.zeros(n_heads))

    def forward(
        self,
        x: torch.Tensor,
        rot: torch.Tensor,
        trans: torch.Tensor,
        present: torch.Tensor,
        bias: torch.Tensor,
    ) -> torch.Tensor:
        """x (B, T, d); rot (B, T, 3, 3); trans (B, T, 3) Angstrom; present (B, T) bool;
        bias (B, 1, T, T) from `geometric_bias` (or anything broadcasting to (B, H, T, T))."""
        B, T, _ = x.shape
        H = self.n_heads
        dtype = torch.promote_types(x.dtype, torch.float32)
        rot, trans = rot.to(dtype), trans.to(dtype)
        with torch.autocast(device_type=x.device.type, enabled=False):
            vec = _linear_in(self.proj, self.norm(x).to(dtype)).view(B, T, 5 * H, 3)
            glob = torch.einsum("btij,bthj->bthi", rot, vec)  # local -> global: R v
            q_rot, k_rot, val, q_dist, k_dist = glob.split(H, dim=2)  # each (B, T, H, 3)
            q_dist = q_dist + trans[:, :, None]
            k_dist = k_dist + trans[:, :, None]
            qr, kr = q_rot.transpose(1, 2), k_rot.transpose(1, 2)  # (B, H, T, 3)
            qd, kd = q_dist.transpose(1, 2), k_dist.transpose(1, 2)
            rot_term = qr @ kr.transpose(-1, -2) / math.sqrt(3)
            # exact pairwise distances without a (B, H, T, T, 3) difference tensor
            dist = torch.cdist(qd, kd, compute_mode="donot_use_mm_for_euclid_dist")
            dist_term = dist / math.sqrt(3)
            w_rot = F.softplus(self.rot_weight)[:, None, None]
            w_dist = F.softplus(self.dist_weight)[:, None, None]
            attn = torch.softmax(rot_term * w_rot - dist_term * w_dist + bias, dim=-1)
            agg = attn @ val.transpose(1, 2)  # (B, H, T, 3), global frame
            local = torch.einsum("btji,bhtj->bthi", rot, agg)  # global -> query's frame
            if self.zero_frameless:
                local = local.masked_fill(~present[:, :, None, None], 0.0)
            out = _linear_in(self.out, local.reshape(B, T, H * 3))
        return out.to(x.dtype)
