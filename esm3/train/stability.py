"""Training stability: non-finite steps, spikes against a rolling median, rollback decisions.

A pure state machine over (step, loss, grad norm): the trainer asks it for a `Verdict`
after the backward pass and before the optimizer step, and acts on it (skip the update,
record events, roll back to the last checkpoint and skip the offending batches: the PaLM
recipe). Its state is part of the checkpoint.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from esm3.train.config import StabilityConfig


@dataclass
class Verdict:
    """What to do with one step."""

    nonfinite: bool = False  # loss or grad norm not finite: skip the update
    loss_spike: bool = False
    grad_spike: bool = False
    loss_median: float = math.nan
    grad_median: float = math.nan
    rollback: bool = False  # roll back to the last checkpoint, skipping the recent batches
    abort: str = ""  # non-empty: stop the run with this reason

    @property
    def spike(self) -> bool:
        return self.loss_spike or self.grad_spike


@dataclass
class StabilityMonitor:
    cfg: StabilityConfig
    losses: deque = field(default_factory=deque)
    grads: deque = field(default_factory=deque)
    spike_steps: deque = field(default_factory=deque)
    nonfinite_total: int = 0
    nonfinite_run: int = 0
    spikes_total: int = 0
    rollbacks: int = 0
    nonfinite_since_checkpoint: int = 0  # not saved: a restored state is at a checkpoint

    def observe(self, step: int, loss: float, grad_norm: float) -> Verdict:
        """Judge one step. Non-finite steps never enter the history; spikes do not either,
        so one bad step does not raise the median that judges the next."""
        c = self.cfg
        v = Verdict()
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            v.nonfinite = True
            self.nonfinite_total += 1
            self.nonfinite_run += 1
            self.nonfinite_since_checkpoint += 1
            if self.nonfinite_run > c.max_nonfinite:
                v.abort = (
                    f"{self.nonfinite_run} consecutive non-finite steps "
                    f"(stability.max_nonfinite = {c.max_nonfinite})"
                )
            return v
        self.nonfinite_run = 0
        if len(self.losses) >= c.min_history:
            v.loss_median = float(np.median(self.losses))
            v.grad_median = float(np.median(self.grads))
            v.loss_spike = loss > c.loss_spike * v.loss_median
            v.grad_spike = grad_norm > c.grad_spike * v.grad_median
        if v.spike:
            self.spikes_total += 1
            self.spike_steps.append(step)
            while self.spike_steps and self.spike_steps[0] <= step - c.rollback_window:
                self.spike_steps.popleft()
            if (
                c.rollback
                and len(self.spike_steps) >= c.rollback_spikes
                and self.rollbacks < c.max_rollbacks
            ):
                v.rollback = True
            return v
        self.losses.append(loss)
        self.grads.append(grad_norm)
        while len(self.losses) > c.window:
            self.losses.popleft()
            self.grads.popleft()
        return v

    def reset_history(self) -> None:
        """Forget the rolling history (a stage switch changes what the loss measures)."""
        self.losses.clear()
        self.grads.clear()
        self.spike_steps.clear()

    @property
    def in_streak(self) -> bool:
        """The latest step was non-finite: no checkpoint is written or pruned now, since its
        weights may be the cause and pruning could delete the last good one."""
        return self.nonfinite_run > 0

    def checkpointed(self) -> bool:
        """Called when a checkpoint is taken: whether the steps since the previous one were
        all finite (the checkpoint is clean); starts counting afresh."""
        clean = self.nonfinite_since_checkpoint == 0
        self.nonfinite_since_checkpoint = 0
        return clean

    def rolled_back(self) -> None:
        """Called after a rollback: the spike burst is over."""
        self.rollbacks += 1
        self.spike_steps.clear()

    def state_dict(self) -> dict:
        return {
            "losses": list(self.losses),
            "grads": list(self.grads),
            "spike_steps": list(self.spike_steps),
            "nonfinite_total": self.nonfinite_total,
            "nonfinite_run": self.nonfinite_run,
            "spikes_total": self.spikes_total,
            "rollbacks": self.rollbacks,
        }

    def load_state_dict(self, state: dict, *, keep_rollbacks: bool = False) -> None:
        rollbacks = self.rollbacks
        self.losses = deque(float(x) for x in state["losses"])
        self.grads = deque(float(x) for x in state["grads"])
        self.spike_steps = deque(int(x) for x in state["spike_steps"])
        for k in ("nonfinite_total", "nonfinite_run", "spikes_total", "rollbacks"):
            setattr(self, k, int(state[k]))
        self.nonfinite_since_checkpoint = 0
        if keep_rollbacks:  # a rollback restores an older state but must not forget itself
            self.rollbacks = max(self.rollbacks, rollbacks)
