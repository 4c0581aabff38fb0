"""What one training step measured (`StepStats`), and its reduction over the ranks.

Everything a step reports or decides on travels in one float64 SUM all-reduce (loss, the
stop flag, tokens, padding, per-track loss sums and positions, tokens per dataset) plus one
MAX all-reduce for the largest attention logit, so every rank takes the same decisions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.distributed as dist

from esm3.train.stability import Verdict


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce(t: torch.Tensor, op: Any = None) -> torch.Tensor:
    """In place over all ranks (SUM by default); a no-op in a world of one."""
    if world_size() > 1:
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


@dataclass
class StepStats:
    """One step's measurements: this rank's until `all_reduce`, then the world's.

    track_loss_sum: per track, the mean loss times its positions (so sums over ranks give a
    position-weighted mean); tracks a rank had no loss for are absent. tokens_by_dataset
    holds every dataset of the run (0 where none was drawn).
    """

    loss: float
    grad_norm: float
    tokens: int
    padding_fraction: float
    tokens_by_dataset: dict[str, int]
    track_loss_sum: dict[str, float] = field(default_factory=dict)
    track_positions: dict[str, float] = field(default_factory=dict)
    max_attn_logit: float = -math.inf
    stop: bool = False
    # set by the trainer after the reduction: the LR used, the stability verdict, whether
    # the update was skipped (non-finite), the update-to-weight ratio (NaN: not measured)
    lr: float = math.nan
    verdict: Verdict | None = None
    skipped: bool = False
    update_ratio: float = math.nan

    def track_loss(self, track: str) -> float | None:
        """Mean loss of a track over all its positions; None when it had none."""
        n = self.track_positions.get(track, 0)
        return self.track_loss_sum[track] / n if n > 0 else None

    def _vector(self, tracks: list[str], datasets: list[str]) -> torch.Tensor:
        vec = torch.zeros(4 + 2 * len(tracks) + len(datasets), dtype=torch.float64)
        vec[0] = self.loss
        vec[1] = float(self.stop)
        vec[2] = self.tokens
        vec[3] = self.padding_fraction
        for i, t in enumerate(tracks):
            if t in self.track_loss_sum:
                vec[4 + 2 * i] = self.track_loss_sum[t]
                vec[5 + 2 * i] = self.track_positions[t]
        for j, name in enumerate(datasets):
            vec[4 + 2 * len(tracks) + j] = self.tokens_by_dataset.get(name, 0)
        return vec

    def all_reduce(self, tracks: list[str], datasets: list[str]) -> StepStats:
        """The world's stats: sums, the mean loss and padding, any rank's stop, the max logit.

        `tracks` and `datasets` fix the layout of the reduced vector: the same on every rank.
        """
        world = world_size()
        vec = all_reduce(self._vector(tracks, datasets))
        mx = all_reduce(torch.tensor([self.max_attn_logit]), dist.ReduceOp.MAX)
        base = 4 + 2 * len(tracks)
        sums = {t: float(vec[4 + 2 * i]) for i, t in enumerate(tracks) if vec[5 + 2 * i] > 0}
        return replace(
            self,
            loss=float(vec[0]) / world,
            stop=bool(vec[1] > 0),
            tokens=int(vec[2]),
            padding_fraction=float(vec[3]) / world,
            track_loss_sum=sums,
            track_positions={t: float(vec[5 + 2 * tracks.index(t)]) for t in sums},
            tokens_by_dataset={n: int(vec[base + j]) for j, n in enumerate(datasets)},
            max_attn_logit=float(mx[0]),
        )
