"""The training job of every rank: `TrainJob`, a `submitit.helpers.Checkpointable` that
records its lifecycle in `jobs` (like `records.Task`) and trains
(`esm3.train.trainer.train`). On the preemption / time-limit signal (USR2) every rank
finishes its step, the ranks save a checkpoint together, record REQUEUED, and rank 0
requeues the job; the next attempt resumes from the latest checkpoint. Rank 0 writes
`train_steps` and `events` through the lake writer.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import submitit

from esm3.metrics.lake import LakeWriter, compact, now
from jobs import launch, records
from jobs.train.config import ckpt_dir, data_root

log = logging.getLogger("esm3.train")


class Requeue(records.Interrupted):
    """Raised inside the job after the preemption checkpoint: requeue this attempt."""


_STOP = {"signal": 0, "at": 0.0}


def _on_signal(signum: int, frame: Any) -> None:  # noqa: ARG001 - signal handler signature
    # only a flag: the training loop checks it at the next step boundary, where every rank
    # can take part in the checkpoint's collectives
    _STOP["signal"] = signum
    _STOP["at"] = time.time()


def stop_requested() -> bool:
    return bool(_STOP["signal"])


class TrainJob(records.Task, submitit.helpers.Checkpointable):
    """The training job of every rank: records RUNNING / COMPLETED / FAILED like
    `records.Task`, and REQUEUED for an attempt interrupted by preemption or time limit.

    `checkpoint()` (submitit's hook, called if submitit's own handler fires before ours is
    installed) resubmits the same job; progress comes from the checkpoints on disk.
    """

    def run(self, ident: dict[str, Any], args: tuple[Any, ...]) -> Any:
        return train_job(Path(self.workspace), self.run_id, args[0], attempt=ident["attempt"])

    def on_interrupted(self, ident: dict[str, Any]) -> None:
        _requeue_and_wait(ident["rank"], self.run_id)  # does not return on SLURM

    def on_sigterm(self) -> None:
        # SLURM's SIGTERM (scancel, a requeue, a downed node) stops training at the next
        # step boundary like USR2, but is recorded as the scheduler says (CANCELLED or
        # REQUEUED) and not requeued again by us; DataLoader workers ignore it
        _on_signal(signal.SIGTERM, None)

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


def _requeue_and_wait(rank: int, run_id: str) -> None:
    """Rank 0 asks the scheduler to requeue the job; every rank then waits to be stopped."""
    env = submitit.JobEnvironment()
    if rank == 0:
        attempt = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
        log.warning("run %s: requeueing job %s (attempt %d)", run_id, env.job_id, attempt)
        env._requeue(max(0, 100 - attempt))  # submitit's requeue (scontrol requeue on SLURM)
    # SLURM stops this attempt's processes; a scheduler that does not gets us out here
    deadline = time.time() + 300
    while time.time() < deadline:
        time.sleep(1.0)
    sys.exit(3)


def train_job(ws: Path, run_id: str, cfg: Any, *, attempt: int = 0) -> dict[str, Any]:
    """What every rank runs inside the job: set-up, training, records. Returns a summary."""
    import torch
    import torch.distributed as dist

    from esm3.train.data import load_datasets
    from esm3.train.trainer import Sinks, train
    from esm3.train.validation import load_all
    from jobs.distributed import init_from_submitit

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    signal.signal(signal.SIGUSR2, _on_signal)
    info = init_from_submitit()
    device = torch.device("cpu")
    if info.backend == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    rank0 = info.rank == 0
    # a live attempt's files are merged every 64 flushes (with summaries), so a page reads
    # a few merged files and a short tail, not one file per 5 s of training
    steps_w = LakeWriter(ws, "train_steps", flush_seconds=5.0, compact_every=64) if rank0 else None
    events_w = LakeWriter(ws, "events", flush_seconds=2.0, compact_every=64) if rank0 else None

    def flush() -> None:  # before a checkpoint is declared: its steps and "saved" event
        for w in (steps_w, events_w):
            if w is not None:
                w.flush()

    sinks = Sinks(
        step=steps_w.add if steps_w else (lambda r: None),
        event=events_w.add if events_w else (lambda r: None),
        flush=flush,
    )
    if rank0:
        changes: dict[str, Any] = dict(status="RUNNING", world_size=info.world_size)
        if attempt == 0:
            changes["started_at"] = now()
        records.update_run(ws, run_id, **changes)
        if attempt:
            sinks.event(
                dict(
                    run_id=run_id,
                    step=None,
                    kind="requeue",
                    severity="warning",
                    message=f"attempt {attempt} started (SLURM_RESTART_COUNT)",
                    value=float(attempt),
                    time=now(),
                )
            )
    try:
        datasets = load_datasets(cfg, data_root(ws))
        on = cfg.validation.every > 0
        validation = load_all(cfg, data_root(ws), datasets) if on else None
        res = train(
            cfg,
            datasets,
            run_id=run_id,
            ckpt_dir=ckpt_dir(ws, run_id),
            device=device,
            sinks=sinks,
            should_stop=stop_requested,
            attempt=attempt,
            validation=validation,
        )
    finally:
        for w in (steps_w, events_w):
            if w is not None:
                w.close()
        if rank0:  # one file per attempt instead of one per flush: fast reads for the dashboard
            for table in ("train_steps", "events"):
                compact(ws, table, run_id=run_id, min_files=2)
    summary = {
        "rank": info.rank,
        "world_size": info.world_size,
        "status": res.status,
        "step": res.step,
        "param_count": res.param_count,
        "losses": res.losses,
        "resumed_from": res.resumed_from,
        "node": os.environ.get("SLURMD_NODENAME"),
    }
    if res.status == "preempted":
        dist.barrier()
        raise Requeue(f"preempted at step {res.step}: checkpoint {res.checkpoint}")
    dist.barrier()
    dist.destroy_process_group()
    if rank0:
        launch.finish_run(ws, run_id, "COMPLETED")
    return summary
