"""Per-track losses on the corrupted positions."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from esm3.tokenize.annotations import FIRST_LABEL


def _default_weights() -> dict[str, float]:
    return {t: 1.0 for t in ("sequence", "structure", "ss8", "sasa", "function", "residue")}


@dataclass
class LossConfig:
    """Weight of each track's loss in the total (tracks absent here weigh 0)."""

    weights: dict[str, float] = field(default_factory=_default_weights)


def track_losses(
    logits: dict[str, torch.Tensor],
    targets: dict[str, torch.Tensor],
    loss_masks: dict[str, torch.Tensor],
    cfg: LossConfig | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, int]]:
    """Weighted total and per-track mean losses over the masked positions.

    logits: model outputs per track; targets: true tokens (B, T) (function (B, T, 8),
    residue (B, T, 16) slots); loss_masks: (B, T) bool. Categorical tracks use
    cross-entropy (function: per slot); residue annotations use binary cross-entropy
    against the multi-hot of their slots over the label ids (from FIRST_LABEL), averaged
    over positions and labels. A track
    with no masked position contributes nothing. Returns (total, {track: mean loss
    (detached)}, {track: number of positions in the loss}).
    """
    cfg = cfg or LossConfig()
    total = None
    per_track: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    for track, lg in logits.items():
        w = cfg.weights.get(track, 0.0)
        m = loss_masks.get(track)
        if m is None or w == 0.0:
            continue
        n = int(m.sum())
        counts[track] = n
        if n == 0:
            continue
        tgt = targets[track]
        if track == "residue":  # multi-label over the label ids (specials and <none> aside)
            slots = tgt[m]  # (n, 16)
            hot = torch.zeros(n, lg.shape[-1], device=lg.device, dtype=torch.float32)
            hot.scatter_(1, slots, 1.0)
            sel = lg[m][:, FIRST_LABEL:].float()
            loss = F.binary_cross_entropy_with_logits(sel, hot[:, FIRST_LABEL:])
        elif track == "function":
            sel = lg[m]  # (n, 8, V)
            loss = F.cross_entropy(sel.reshape(-1, sel.shape[-1]).float(), tgt[m].reshape(-1))
        else:
            loss = F.cross_entropy(lg[m].float(), tgt[m])
        per_track[track] = loss.detach()
        total = w * loss if total is None else total + w * loss
    if total is None:
        any_logit = next(iter(logits.values()))
        total = any_logit.float().sum() * 0.0  # fp32, as every track's loss
    return total, per_track, counts
