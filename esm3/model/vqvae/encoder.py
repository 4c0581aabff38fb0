"""The VQ-VAE's structure encoder (paper A.1.7), with `esm`'s StructureTokenEncoder math so
its weights load unchanged (interop.esm converts them).

Each residue is encoded from its local neighbourhood: its k nearest residues by CA distance
(itself first), whose frames go through a stack of geometric-attention blocks; the query's
embedding after the stack, projected to d_code, is quantised by the EMA codebook. A
residue's token therefore depends on its neighbourhood only, and is invariant to global
rotations and translations. Neighbours are chosen as `esm` chooses them: within one sequence
id, present residues by CA distance, then residues without a frame by sequence distance,
padding and other sequences last. Unlike `esm`, neighbours from padding or another
sequence (only chosen when a sequence has fewer than k residues) are masked out of
attention, so a chain's tokens do not depend on what it is packed with.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from esm3.model.backends import SwiGLU
from esm3.model.geometry import GeometricAttention, backbone_frames
from esm3.model.vqvae.codebook import EMACodebook
from esm3.model.vqvae.config import EncoderConfig
from esm3.tokenize.specials import structure_specials

_ABSENT_DIST = 1e6  # as esm: pairs without coordinates rank after every real distance
_SEQ_STEP = 1e2  # ... and among themselves by sequence distance, 100 per residue
TOKENIZE_CHUNK = 1024  # queries per neighbourhood batch: bounds memory on long chains


def ffn_hidden(d_model: int, expansion: float = 4.0) -> int:
    """`esm`'s SwiGLU width: expansion * d_model rounded up to a multiple of 256."""
    return int((expansion * d_model + 255) // 256 * 256)


@dataclass
class EncoderOutput:
    z: torch.Tensor  # (B, L, d_code) before quantisation
    z_q: torch.Tensor  # (B, L, d_code) quantised, straight-through gradients
    codes: torch.Tensor  # (B, L) int64 nearest codes (meaningless where not `present`)
    present: torch.Tensor  # (B, L) bool: residue has a frame (complete backbone)
    commitment_loss: torch.Tensor  # 0-d, over present residues


@dataclass(frozen=True)
class _Context:
    """Per-residue inputs of one embed call, (B, L, ...)."""

    rot: torch.Tensor
    trans: torch.Tensor
    present: torch.Tensor
    valid: torch.Tensor
    sequence_id: torch.Tensor
    residue_index: torch.Tensor


class EncoderBlock(nn.Module):
    """Geometric attention then SwiGLU, both residual, biases everywhere (as esm's encoder)."""

    def __init__(self, d_model: int, geom_heads: int) -> None:
        super().__init__()
        self.geom = GeometricAttention(d_model, geom_heads, bias=True, zero_frameless=False)
        self.ffn = SwiGLU(d_model, ffn_hidden(d_model), bias=True)

    def forward(
        self,
        x: torch.Tensor,
        rot: torch.Tensor,
        trans: torch.Tensor,
        present: torch.Tensor,
        bias: torch.Tensor,
    ) -> torch.Tensor:
        x = x + self.geom(x, rot, trans, present, bias)
        return x + self.ffn(x)


def knn_edges(
    ca: torch.Tensor,
    present: torch.Tensor,
    valid: torch.Tensor,
    sequence_id: torch.Tensor,
    queries: torch.Tensor,
    k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k neighbours of the query positions `queries` (Q,) in every row.

    ca (B, L, 3); present, valid (B, L) bool (frame / not padding); sequence_id (B, L).
    Returns (edges (B, Q, k) key positions, the query itself first; usable (B, Q, k) bool:
    same sequence and not padding)."""
    L = ca.shape[1]
    qca, qpresent = ca[:, queries], present[:, queries]
    dist = torch.cdist(qca, ca, compute_mode="donot_use_mm_for_euclid_dist")  # (B, Q, L)
    seq_gap = (queries[:, None] - torch.arange(L, device=ca.device)[None]).abs()
    both = qpresent[:, :, None] & present[:, None, :]
    rank = torch.where(both, dist, _ABSENT_DIST + _SEQ_STEP * seq_gap.to(dist.dtype))
    usable = (sequence_id[:, queries, None] == sequence_id[:, None, :]) & valid[:, None, :]
    usable &= valid[:, queries, None]
    rank = rank.masked_fill(~usable, float("inf"))
    # the query first even for padding or duplicate coordinates
    rank[:, torch.arange(len(queries), device=ca.device), queries] = -1.0
    order, edges = rank.topk(k, dim=-1, largest=False, sorted=True)
    return edges, order.isfinite()


class StructureEncoder(nn.Module):
    """Backbone coordinates -> per-residue pre-quantisation vectors and structure tokens."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.rel_pos = nn.Embedding(2 * cfg.rel_pos_bins + 2, cfg.d_model)
        nn.init.normal_(self.rel_pos.weight, std=0.02)
        self.blocks = nn.ModuleList(
            EncoderBlock(cfg.d_model, cfg.geom_heads) for _ in range(cfg.n_layers)
        )
        self.pre_vq = nn.Linear(cfg.d_model, cfg.d_code)
        self.codebook = EMACodebook(cfg.n_codes, cfg.d_code, cfg.ema_decay,
                                    cfg.restart_threshold, cfg.commitment)  # fmt: skip

    @property
    def dtype(self) -> torch.dtype:
        return self.pre_vq.weight.dtype

    @property
    def mask_token(self) -> int:
        return structure_specials(self.cfg.n_codes).mask

    def embed(
        self,
        coords: torch.Tensor,
        mask: torch.Tensor | None = None,
        sequence_id: torch.Tensor | None = None,
        residue_index: torch.Tensor | None = None,
        chunk_size: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """coords (B, L, 3, 3) Angstrom (N, CA, C; NaN where missing); mask (B, L) bool, False
        at padding; sequence_id (B, L) packed sequences; residue_index (B, L) int64 (default
        0..L-1). Returns (z (B, L, d_code), zero-input projection where not present; present
        (B, L) bool). `chunk_size`: queries per neighbourhood batch (default all at once)."""
        _check_coords(coords, batched=True)
        B, L = coords.shape[:2]
        dev = coords.device
        valid = _per_residue(mask, "mask", B, L, torch.ones(B, L, dtype=torch.bool, device=dev))
        seq = _per_residue(
            sequence_id, "sequence_id", B, L, torch.zeros_like(valid, dtype=torch.long)
        )
        res = _per_residue(
            residue_index, "residue_index", B, L, torch.arange(L, device=dev).expand(B, L)
        )
        frames = backbone_frames(coords, torch.promote_types(self.dtype, torch.float32))
        valid = valid.bool()
        present = frames[2] & valid
        ctx = _Context(frames[0], frames[1], present, valid, seq, res.long())
        step = max(1, (chunk_size or B * L) // B)
        parts = [self._local(ctx, torch.arange(s, min(s + step, L), device=dev))
                 for s in range(0, L, step)]  # fmt: skip
        h = torch.cat(parts, dim=1).masked_fill(~present[..., None], 0.0)
        return self.pre_vq(h), present

    def _local(self, ctx: _Context, queries: torch.Tensor) -> torch.Tensor:
        """(B, Q, d_model): each query's embedding from its neighbourhood."""
        rot, trans, present, res = ctx.rot, ctx.trans, ctx.present, ctx.residue_index
        B, Q = rot.shape[0], len(queries)
        k = min(self.cfg.knn, rot.shape[1])
        edges, usable = knn_edges(trans, present, ctx.valid, ctx.sequence_id, queries, k)
        rows = torch.arange(B, device=rot.device)[:, None, None]
        key_present = present[rows, edges] & usable  # (B, Q, k)
        bins = self.cfg.rel_pos_bins
        gap = (res[rows, edges] - res[:, queries, None]).clamp(-bins, bins) + bins + 1
        x = self.rel_pos(gap).reshape(B * Q, k, -1)
        n_rot = rot[rows, edges].reshape(B * Q, k, 3, 3)
        n_trans = trans[rows, edges].reshape(B * Q, k, 3)
        n_present = key_present.reshape(B * Q, k)
        bias = torch.zeros(B * Q, 1, 1, k, dtype=torch.float32, device=rot.device)
        bias = bias.masked_fill(~n_present[:, None, None], torch.finfo(torch.float32).min)
        for block in self.blocks:
            x = block(x, n_rot, n_trans, n_present, bias)
        return x[:, 0].reshape(B, Q, -1)

    def forward(
        self,
        coords: torch.Tensor,
        mask: torch.Tensor | None = None,
        sequence_id: torch.Tensor | None = None,
        residue_index: torch.Tensor | None = None,
    ) -> EncoderOutput:
        """Embed and quantise; in training mode the codebook's EMA update runs on the present
        residues."""
        z, present = self.embed(coords, mask, sequence_id, residue_index)
        z_q, codes, loss = self.codebook(z, present)
        return EncoderOutput(z=z, z_q=z_q, codes=codes, present=present, commitment_loss=loss)

    def encode(
        self,
        coords: torch.Tensor,
        mask: torch.Tensor | None = None,
        sequence_id: torch.Tensor | None = None,
        residue_index: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(z_q, codes) as `esm`'s encode: codes everywhere, frameless residues included."""
        out = self.forward(coords, mask, sequence_id, residue_index)
        return out.z_q, out.codes

    @torch.no_grad()
    def tokenize(self, coords: torch.Tensor, chunk_size: int = TOKENIZE_CHUNK) -> torch.Tensor:
        """One chain's backbone (L, 3, 3) float Angstrom (N, CA, C; NaN where missing) ->
        (L,) int64 structure tokens, MASK where a residue has no complete backbone. Runs in
        the module's dtype, `chunk_size` queries at a time; never updates the codebook."""
        _check_coords(coords, batched=False)
        x = coords.to(device=self.pre_vq.weight.device)[None]
        z, present = self.embed(x, chunk_size=chunk_size)
        codes = self.codebook.nearest(z)
        return codes.masked_fill(~present, self.mask_token)[0]


def _check_coords(coords: torch.Tensor, *, batched: bool) -> None:
    want = "(B, L, 3, 3)" if batched else "(L, 3, 3)"
    if not isinstance(coords, torch.Tensor):
        raise ValueError(f"coords must be a torch tensor {want}, got {type(coords).__name__}")
    if not coords.is_floating_point():
        raise ValueError(f"coords must be floating point (Angstrom), got {coords.dtype}")
    if coords.dim() != (4 if batched else 3) or tuple(coords.shape[-2:]) != (3, 3):
        raise ValueError(
            f"coords must have shape {want} (atoms N, CA, C), got {tuple(coords.shape)}"
        )
    if coords.shape[-3] == 0:
        raise ValueError("coords has no residues (L == 0)")


def _per_residue(
    t: torch.Tensor | None, name: str, B: int, L: int, default: torch.Tensor
) -> torch.Tensor:
    if t is None:
        return default
    if tuple(t.shape) != (B, L):
        raise ValueError(f"{name} must have shape (B, L) = {(B, L)}, got {tuple(t.shape)}")
    return t.to(default.device)
