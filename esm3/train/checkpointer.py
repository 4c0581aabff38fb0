"""The trainer's checkpointing: when to save, saving (sync or async) and declaring, loading.

A thin stateful layer over `esm3.train.checkpoint` (hashes, clean-aware pruning, the
manifest written last): it holds the one save that may still be in flight, runs the
declaration (the "saved" event, then a flush of every row so far) just before a manifest
is renamed into place, and reports a checkpoint refused on load as an event.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from esm3.train import checkpoint as ckpt
from esm3.train.config import CheckpointConfig
from esm3.train.reporting import EventLog


class Checkpointer:
    """Checkpoints of one run's model and optimizer in `folder`.

    `fingerprint` is what a checkpoint must match to load (another model is refused);
    `flush` makes every metrics row given so far durable.
    """

    def __init__(
        self,
        cfg: CheckpointConfig,
        folder: str | Path,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        fingerprint: dict[str, Any],
        events: EventLog,
        flush: Callable[[], None],
        rank: int = 0,
        process_group: Any = None,
    ) -> None:
        self.cfg = cfg
        self.folder = Path(folder)
        self.model = model
        self.optimizer = optimizer
        self.fingerprint = fingerprint
        self.events = events
        self.flush = flush
        self.rank = rank
        self.process_group = process_group
        self.pending: ckpt.PendingSave | None = None
        self.last_path = ""

    # --- decisions -------------------------------------------------------------------

    def periodic_due(self, step: int, total: int) -> bool:
        """A periodic checkpoint after `step` (none at the end: the final save is its own)."""
        return bool(self.cfg.every) and step % self.cfg.every == 0 and step < total

    def is_async(self, reason: str) -> bool:
        """Only periodic saves overlap training; preemption and final saves must be done."""
        return self.cfg.async_save and reason == "periodic"

    def steps(self) -> list[int]:
        return [s for s, _ in ckpt.list_checkpoints(self.folder)]

    # --- loading ---------------------------------------------------------------------

    def load_latest(self, at_step: int, max_step: int | None = None) -> tuple[Path, dict] | None:
        """Load the newest loadable checkpoint (at most `max_step`) into model and optimizer;
        each one refused on the way is a `checkpoint_corrupt` event at `at_step`."""

        def refused(path: Path, reason: str) -> None:
            self.events(
                at_step,
                "checkpoint_corrupt",
                f"{path.name} refused, falling back: {reason}",
                "warning",
                path=str(path),
            )

        return ckpt.load_latest(
            self.folder,
            self.model,
            self.optimizer,
            expected_model=self.fingerprint,
            on_failure=refused,
            process_group=self.process_group,
            max_step=max_step,
        )

    def load_initial_weights(self) -> None:
        """The weights of `init_from` (another run's checkpoint of the same model)."""
        src = self.cfg.init_from
        ckpt.check_compatible(ckpt.read_state(src), self.fingerprint, src)
        ckpt.load(src, self.model, None, process_group=self.process_group)
        self.events(0, "init", f"weights from {src}")

    # --- saving ----------------------------------------------------------------------

    def save(self, step: int, reason: str, train_state: Callable[[], dict[str, Any]]) -> None:
        """Save at `step`; `train_state()` (collective) is taken after any earlier save is done.

        Declared (event, flush, manifest) now, or for an async save when it is finished."""
        self.finish_pending()
        t0 = time.perf_counter()
        state = train_state()

        def declare() -> None:  # the saved event and all rows so far, durable before the manifest
            self.events(
                step,
                "checkpoint",
                f"saved {ckpt.step_dir(self.folder, step).name} ({reason})",
                value=time.perf_counter() - t0,
                path=str(ckpt.step_dir(self.folder, step)),
                reason=reason,
                clean=state["clean"],
            )
            self.flush()

        saved = ckpt.save(
            self.folder,
            step,
            self.model,
            self.optimizer,
            state,
            rank=self.rank,
            keep=self.cfg.keep,
            async_save=self.is_async(reason),
            process_group=self.process_group,
            before_commit=declare,
        )
        if not saved.finished:
            self.pending = saved
        self.last_path = str(saved.path)

    def poll(self, *, prune_old: bool) -> None:
        """Declare an async save whose write has finished."""
        if self.pending is not None and self.pending.done():
            self.finish_pending(prune_old=prune_old)

    def finish_pending(self, *, prune_old: bool = True) -> None:
        """Wait for an async save and declare it (before another save, a load, the end)."""
        if self.pending is not None:
            self.pending.finish(prune_old=prune_old)
            self.pending = None
