"""The VQ-VAE's codebook (paper A.1.7): nearest-code quantisation with codes learnt by an
exponential moving average, not by gradients.

Buffers are named as `esm`'s EMACodebook (`embeddings`, `N`, `z_avg`), so its state dict
loads strictly. Training mode does, per forward and over the masked positions only:
- data-dependent init when `N.sum() == 0`: codes drawn from the batch's encoder outputs.
  The test is on the buffers, not a Python flag, so a loaded or resumed codebook is never
  re-initialised;
- EMA of each code's count `N` and sum `z_avg`, the code being `z_avg` over the
  Laplace-smoothed count (no division by zero for unused codes);
- restarts: a code whose EMA count falls below `restart_threshold` is replaced by a randomly
  chosen encoder output of the batch.
Under torch.distributed counts and sums are summed over ranks and random draws come from
rank 0, so every rank's codebook stays identical. In eval mode (a frozen codebook, as in
stage 2) it only quantises.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

LAPLACE_EPS = 1e-7  # pseudo-count of the smoothed normalisation
TILE_NOISE = 0.01  # std (over sqrt(d)) of the jitter on repeated draws, so copies differ


@dataclass(frozen=True)
class CodebookStats:
    """One forward's code usage over its masked positions (all ranks when training)."""

    codes_used: torch.Tensor  # 0-d: distinct codes assigned
    perplexity: torch.Tensor  # 0-d: exp(entropy of the assignment frequencies)
    restarted: torch.Tensor  # 0-d: dead codes replaced this forward


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    if _distributed():
        dist.all_reduce(t)
    return t


def perplexity(counts: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of the frequencies `counts / counts.sum()`; 0 for no counts."""
    total = counts.sum()
    p = counts / total.clamp_min(1e-12)
    entropy = -(p * torch.log(p.clamp_min(1e-30))).sum()
    return torch.where(total > 0, torch.exp(entropy), torch.zeros_like(entropy))


class EMACodebook(nn.Module):
    """Quantises (B, L, d_code) vectors to the nearest of `n_codes` codes."""

    def __init__(
        self,
        n_codes: int,
        d_code: int,
        decay: float = 0.99,
        restart_threshold: float = 1.0,
        commitment: float = 0.25,
    ) -> None:
        super().__init__()
        self.n_codes, self.d_code = n_codes, d_code
        self.decay, self.restart_threshold, self.commitment = decay, restart_threshold, commitment
        self.register_buffer("embeddings", torch.randn(n_codes, d_code))
        self.register_buffer("N", torch.zeros(n_codes))  # zero counts: not initialised yet
        self.register_buffer("z_avg", self.embeddings.clone())
        self.last_stats: CodebookStats | None = None

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """(..., d_code) -> (...) int64 index of the nearest code (squared Euclidean), in
        float32 at least: bf16 distances would tie."""
        dtype = torch.promote_types(torch.promote_types(z.dtype, self.embeddings.dtype),
                                    torch.float32)  # fmt: skip
        flat = z.reshape(-1, self.d_code).to(dtype)
        codes = self.embeddings.to(dtype)
        with torch.autocast(device_type=z.device.type, enabled=False):
            dist2 = (
                (flat * flat).sum(-1, keepdim=True)
                - 2 * flat @ codes.t()
                + (codes * codes).sum(-1)[None]
            )
        return dist2.argmin(-1).view(z.shape[:-1])

    def forward(
        self, z: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z (B, L, d_code), mask (B, L) bool (default all) -> (z_q with straight-through
        gradients, codes (B, L) int64, commitment loss beta * mse(z, sg(z_q)) over the mask).
        Codes are assigned with the codebook as it was before this forward's update."""
        if mask is None:
            mask = torch.ones(z.shape[:-1], dtype=torch.bool, device=z.device)
        mask = mask.bool()
        if self.training and bool(self.N.sum() == 0):
            self._init_from(z.detach()[mask])
        codes = self.nearest(z.detach())
        z_q = F.embedding(codes, self.embeddings)
        loss = self._commitment(z, z_q, mask)
        counts = torch.bincount(codes[mask], minlength=self.n_codes).to(self.N.dtype)
        restarted = torch.zeros((), dtype=torch.long, device=z.device)
        if self.training:
            with torch.no_grad():
                counts = self._ema_update(z.detach(), codes, mask, counts)
                restarted = self._restart_dead(z.detach()[mask])
        self.last_stats = CodebookStats(
            codes_used=(counts > 0).sum(), perplexity=perplexity(counts), restarted=restarted
        )
        return z + (z_q.to(z.dtype) - z).detach(), codes, loss

    def _commitment(
        self, z: torch.Tensor, target: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """beta * mse(z, sg(target)) over the mask, in float32 at least."""
        z = z.to(torch.promote_types(z.dtype, torch.float32))
        sq = ((z - target.detach().to(z.dtype)) ** 2).mean(-1) * mask
        return self.commitment * sq.sum() / mask.sum().clamp_min(1)

    def _draw(self, pool: torch.Tensor, n: int) -> torch.Tensor:
        """n rows drawn at random from `pool` (the codes themselves if it is empty), rows
        repeated with a small jitter when there are fewer than n; rank 0's draw everywhere."""
        pool = pool.to(self.embeddings.dtype)
        if pool.shape[0] == 0:
            pool = self.embeddings.clone()
        g = self._state_generator()
        if pool.shape[0] < n:
            pool = pool.repeat(-(-n // pool.shape[0]), 1)
            noise = torch.randn(pool.shape, generator=g, dtype=pool.dtype)
            pool = pool + noise.to(pool.device) * (TILE_NOISE / self.d_code**0.5)
        pick = torch.randperm(pool.shape[0], generator=g)[:n].to(pool.device)
        rows = pool[pick].contiguous()
        if _distributed():
            dist.broadcast(rows, 0)
        return rows

    def _state_generator(self) -> torch.Generator:
        """A generator seeded by the codebook's own counts: a run resumed from a checkpoint
        (which holds them, but not the process's random state) draws what it would have."""
        seed = zlib.crc32(self.N.detach().float().cpu().numpy().tobytes())
        return torch.Generator().manual_seed(seed)

    def _init_from(self, z_rows: torch.Tensor) -> None:
        rows = self._draw(z_rows, self.n_codes)
        self.embeddings.copy_(rows)
        self.z_avg.copy_(rows)
        self.N.fill_(1.0)

    def _ema_update(
        self, z: torch.Tensor, codes: torch.Tensor, mask: torch.Tensor, counts: torch.Tensor
    ) -> torch.Tensor:
        """EMA of counts and sums (summed over ranks); returns the global batch counts."""
        sums = torch.zeros_like(self.z_avg)
        sums.index_add_(0, codes[mask], z[mask].to(sums.dtype))
        counts, sums = _all_reduce(counts), _all_reduce(sums)
        d = self.decay
        self.N.mul_(d).add_(counts, alpha=1 - d)
        self.z_avg.mul_(d).add_(sums, alpha=1 - d)
        total = self.N.sum()
        smoothed = (self.N + LAPLACE_EPS) / (total + self.n_codes * LAPLACE_EPS) * total
        self.embeddings.copy_(self.z_avg / smoothed[:, None])
        return counts

    def _restart_dead(self, z_rows: torch.Tensor) -> torch.Tensor:
        """Replace codes with EMA count below the threshold by batch outputs; the count is
        reset to the init's 1 (so z_avg / N is the new code)."""
        dead = self.N < self.restart_threshold
        n_dead = int(dead.sum())  # the same on every rank: N is
        if n_dead:
            rows = self._draw(z_rows, n_dead)
            self.embeddings[dead] = rows
            self.z_avg[dead] = rows
            self.N[dead] = 1.0
        return torch.tensor(n_dead, device=self.N.device)

    def extra_repr(self) -> str:
        return (
            f"n_codes={self.n_codes}, d_code={self.d_code}, decay={self.decay}, "
            f"restart_threshold={self.restart_threshold}, commitment={self.commitment}"
        )
