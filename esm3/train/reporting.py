"""Where a run's rows go: `events` (`EventLog`) and `train_steps` (`StepRows`).

Only rank 0 writes rows; every rank logs events, so a rank's log tells its own story.
"""

from __future__ import annotations

import json
import logging
import math
import resource
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import torch

from esm3.metrics.schema import TABLES
from esm3.train.stats import StepStats

STEP_COLUMNS = frozenset(TABLES["train_steps"].names)

log = logging.getLogger("esm3.train")

Row = dict[str, Any]


def now() -> datetime:
    return datetime.now(UTC)


@dataclass
class Sinks:
    """Where rank 0's rows go (train_steps rows, events rows); no-ops by default.

    `flush` makes every row given so far durable; it runs before a checkpoint is declared."""

    step: Callable[[Row], None] = lambda r: None
    event: Callable[[Row], None] = lambda r: None
    flush: Callable[[], None] = lambda: None


@dataclass
class EventLog:
    """`events` rows of one run (rank 0) and a log line for each (every rank)."""

    run_id: str
    rank: int
    sink: Callable[[Row], None]

    def __call__(
        self,
        step: int,
        kind: str,
        message: str,
        severity: str = "info",
        value: float | None = None,
        **detail: Any,
    ) -> None:
        if self.rank == 0:
            self.sink(
                dict(
                    run_id=self.run_id,
                    step=step,
                    kind=kind,
                    severity=severity,
                    message=message,
                    value=value,
                    detail=json.dumps(detail, default=str) if detail else None,
                    time=now(),
                )
            )
        log.info("[%s] step %d: %s", kind, step, message)


@dataclass
class StepTiming:
    """Wall time of a step (from the end of the previous one) and its wait for data."""

    step_s: float
    data_wait_s: float


@dataclass
class StepRows:
    """Builds and sends the `train_steps` row of every `every`-th step (and the last).

    flops_per_token(seq_len) and the device's peak FLOP/s (None: no MFU) give MFU."""

    run_id: str
    attempt: int
    every: int
    clip: float
    tracks: list[str]
    metrics: list[str]
    device: torch.device
    world: int
    peak_flops: float | None
    flops_per_token: Callable[[int], float]
    sink: Callable[[Row], None]
    _fpt: dict[int, float] = field(default_factory=dict)

    def due(self, step: int, end: int) -> bool:
        return step % self.every == 0 or step == end

    def mfu(self, seq_len: int, tokens: int, seconds: float) -> float | None:
        if seq_len not in self._fpt:
            self._fpt[seq_len] = self.flops_per_token(seq_len)
        if not self.peak_flops:
            return None
        return self._fpt[seq_len] * tokens / seconds / (self.peak_flops * self.world)

    def row(
        self,
        step: int,
        stage: str,
        stats: StepStats,
        *,
        tokens_seen: int,
        tokens_by_dataset: dict[str, int],
        timing: StepTiming,
        seq_len: int,
    ) -> Row:
        dt = timing.step_s
        mx = stats.max_attn_logit
        row: Row = dict(
            run_id=self.run_id,
            step=step,
            attempt=self.attempt,
            stage=stage,
            loss=stats.loss,
            lr=stats.lr,
            grad_norm=stats.grad_norm,
            clipped=bool(stats.grad_norm > self.clip),
            skipped=stats.skipped,
            update_ratio=None if math.isnan(stats.update_ratio) else stats.update_ratio,
            max_attn_logit=mx if math.isfinite(mx) else None,
            tokens=stats.tokens,
            tokens_seen=tokens_seen,
            tokens_by_dataset=json.dumps(tokens_by_dataset, sort_keys=True),
            step_time_s=dt,
            data_wait_s=timing.data_wait_s,
            tokens_per_s=stats.tokens / dt if dt > 0 else None,
            mfu=self.mfu(seq_len, stats.tokens, dt),
            mem_peak_gb=peak_mem_gb(self.device),
            time=now(),
        )
        extra: dict[str, float | None] = {}
        for t in self.tracks:
            col = f"loss_{t}"
            (row if col in STEP_COLUMNS else extra)[col] = stats.track_loss(t)
        for m in self.metrics:
            extra[m] = stats.track_loss(m)
        row["metrics"] = json.dumps(extra, sort_keys=True) if extra else None
        return row

    def emit(self, step: int, end: int, rank: int, stage: str, stats: StepStats, **kw: Any) -> None:
        if rank == 0 and self.due(step, end):
            self.sink(self.row(step, stage, stats, **kw))


def peak_mem_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (process peak)
