"""Geometric attention: attention over residues from their backbone frames.

Each residue with coordinates gets a frame (R, t) from N, CA, C (Gram-Schmidt: x along
CA->C, y in the N-CA-C plane, z = x cross y; t = CA). Per head, a residue's features give
local 3-vectors: a direction query/key, a distance query/key and a value. Rotated (and for
distances translated) into the global frame, they score pairs by
  w_dir * <R_i qd_i, R_j kd_j> - w_dist * |(R_i qp_i + t_i) - (R_j kp_j + t_j)|,
which a global rotation + translation leaves unchanged; values are summed in the global
frame and rotated back into the query's local frame, so the output is invariant too.
Pairs across chains, across packed sequences, or with a residue without coordinates are
masked; a residue without coordinates gets zero output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def backbone_frames(coords: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Frames from backbone atoms.

    coords: (B, T, 3, 3) Angstrom (atoms N, CA, C), NaN where not given.
    Returns (rotations (B, T, 3, 3) with the frame axes as columns, translations (B, T, 3)
    = CA, present (B, T) bool). Missing residues get the identity frame at the origin.
    """
    present = torch.isfinite(coords).all(dim=-1).all(dim=-1)
    x = torch.where(present[..., None, None], coords, torch.zeros_like(coords)).float()
    n, ca, c = x[..., 0, :], x[..., 1, :], x[..., 2, :]
    e1 = F.normalize(c - ca, dim=-1, eps=1e-6)
    u = n - ca
    e2 = F.normalize(u - (u * e1).sum(-1, keepdim=True) * e1, dim=-1, eps=1e-6)
    e3 = torch.cross(e1, e2, dim=-1)
    rot = torch.stack([e1, e2, e3], dim=-1)
    eye = torch.eye(3, device=coords.device, dtype=rot.dtype).expand_as(rot)
    rot = torch.where(present[..., None, None], rot, eye)
    return rot, ca, present


def geometric_mask(
    present: torch.Tensor, chain_id: torch.Tensor | None, sequence_id: torch.Tensor | None
) -> torch.Tensor:
    """(B, T, T) bool: i may attend j when both have coordinates, same chain, same sequence."""
    ok = present[:, :, None] & present[:, None, :]
    if chain_id is not None:
        ok = ok & (chain_id[:, :, None] == chain_id[:, None, :])
    if sequence_id is not None:
        ok = ok & (sequence_id[:, :, None] == sequence_id[:, None, :])
    return ok


class GeometricAttention(nn.Module):
    """Pre-LN geometric self-attention; (B, T, d) -> (B, T, d). Runs in float32."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.norm = nn.LayerNorm(d_model)
        # per head: direction q/k, distance q/k, value: 5 three-vectors
        self.proj = nn.Linear(d_model, n_heads * 15, bias=False)
        self.out = nn.Linear(n_heads * 3, d_model, bias=False)
        self.dir_weight = nn.Parameter(torch.zeros(n_heads))
        self.dist_weight = nn.Parameter(torch.zeros(n_heads))

    def forward(
        self,
        x: torch.Tensor,
        rot: torch.Tensor,
        trans: torch.Tensor,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        """x (B, T, d); rot (B, T, 3, 3); trans (B, T, 3) Angstrom; mask (B, T, T) bool."""
        B, T, _ = x.shape
        H = self.n_heads
        with torch.autocast(device_type=x.device.type, enabled=False):
            vec = self.proj(self.norm(x).float()).view(B, T, H, 5, 3)
            # local -> global: v_glob = R v_loc  (R's columns are the frame axes)
            glob = torch.einsum("btij,bthkj->bthki", rot, vec)
            q_dir, k_dir, q_pos, k_pos, val = glob.unbind(dim=3)  # each (B, T, H, 3)
            q_pos = q_pos + trans[:, :, None]
            k_pos = k_pos + trans[:, :, None]
            qd, kd = q_dir.transpose(1, 2), k_dir.transpose(1, 2)  # (B, H, T, 3)
            qp, kp = q_pos.transpose(1, 2), k_pos.transpose(1, 2)
            dots = qd @ kd.transpose(-1, -2)
            d2 = (qp * qp).sum(-1)[..., :, None] + (kp * kp).sum(-1)[..., None, :]
            d2 = d2 - 2.0 * (qp @ kp.transpose(-1, -2))
            dist = torch.sqrt(d2.clamp_min(1e-6))
            w_dir = F.softplus(self.dir_weight)[None, :, None, None] / 3**0.5
            w_dist = F.softplus(self.dist_weight)[None, :, None, None] / 3**0.5
            logits = w_dir * dots - w_dist * dist
            allowed = mask[:, None]
            logits = logits.masked_fill(~allowed, torch.finfo(logits.dtype).min)
            attn = torch.softmax(logits, dim=-1) * allowed  # rows with nothing allowed -> 0
            agg = attn @ val.transpose(1, 2)  # (B, H, T, 3), global frame
            # global -> query's local frame: R_i^T v
            local = torch.einsum("btji,bhtj->bthi", rot, agg)
            out = self.out(local.reshape(B, T, H * 3))
        return out.to(x.dtype)
