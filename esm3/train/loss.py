"""The ESM3 training loss as the trainer calls it: `loss_fn(model_output, batch)`.

The trainer knows nothing of tracks or heads; a loss function returns a `LossOutput`
(the scalar to back-propagate, and per-track means with their position counts to report).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from esm3.model.loss import LossConfig, track_losses


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar, back-propagated
    per_track: dict[str, torch.Tensor]  # track -> mean loss (detached)
    counts: dict[str, int]  # track -> positions in that mean
    # a model's own per-step values besides its losses (the VQ-VAE's codebook usage);
    # reported under their names, averaged over the ranks
    metrics: dict[str, float] = field(default_factory=dict)


class LossFn(Protocol):
    def __call__(self, output: Any, batch: Any) -> LossOutput: ...


class ESM3Loss:
    """Weighted per-track cross-entropy of ESM3's heads over the batch's masked positions."""

    def __init__(self, weights: dict[str, float]) -> None:
        self.cfg = LossConfig(weights=dict(weights))

    def __call__(self, output: Any, batch: Any) -> LossOutput:
        """`batch` is on the model's device (targets and loss masks as the loader made them)."""
        loss, per_track, counts = track_losses(
            output.logits, batch.targets, batch.loss_masks, self.cfg
        )
        # every head must get a gradient on every rank (zero where its track is not in
        # this rank's loss): FSDP2 reduce-scatters only parameters with gradients, and
        # ranks disagreeing on that set would mismatch their collectives
        unused = [lg for t, lg in output.logits.items() if t not in per_track]
        if unused:
            loss = loss + 0.0 * sum(lg.float().sum() for lg in unused)
        return LossOutput(loss, per_track, counts)
