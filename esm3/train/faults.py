"""Planted faults for stability drills and tests (`stability.inject_nan` / `inject_spike`).

The batch iterator is wrapped to tag the batches of the listed data indices, and the loss
function is wrapped to act on the tag: a NaN loss, or one scaled by `spike_scale`. The
trainer's step stays free of test hooks; a run without faults gets both unwrapped.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from esm3.train.config import StabilityConfig
from esm3.train.loss import LossFn, LossOutput

if TYPE_CHECKING:  # data imports this module
    from esm3.train.data import TrainBatch

NAN = "nan"
SPIKE = "spike"


def fault_at(data_step: int, cfg: StabilityConfig) -> str:
    """The fault planted at a data index: "nan", "spike" or "" (NaN wins over a spike)."""
    if data_step in cfg.inject_nan:
        return NAN
    if data_step in cfg.inject_spike:
        return SPIKE
    return ""


def inject_faults(batches: Iterator[TrainBatch], cfg: StabilityConfig) -> Iterator[TrainBatch]:
    """The batches, each tagged with the fault planted at its data index."""
    if not (cfg.inject_nan or cfg.inject_spike):
        return batches
    return (_tagged(b, cfg) for b in batches)


def _tagged(batch: TrainBatch, cfg: StabilityConfig) -> TrainBatch:
    batch.fault = fault_at(batch.data_step, cfg)
    return batch


def faulty_loss(loss_fn: LossFn, cfg: StabilityConfig) -> LossFn:
    """`loss_fn` whose loss turns NaN or spikes on batches tagged by `inject_faults`."""
    if not (cfg.inject_nan or cfg.inject_spike):
        return loss_fn

    def loss_with_faults(output: object, batch: TrainBatch) -> LossOutput:
        out = loss_fn(output, batch)
        if batch.fault == NAN:
            out.loss = out.loss * float("nan")
        elif batch.fault == SPIKE:
            out.loss = out.loss * cfg.spike_scale
        return out

    return loss_with_faults
