"""The training loop: a `Trainer` over a model and a loss function given from outside.

No SLURM or file-layout knowledge: the caller gives the checkpoint folder, the batches,
the sinks for `train_steps` and `events` rows (rank 0 writes them), and a `should_stop`
flag (the preemption signal). Every rank runs the trainer; all decisions that change
control flow (skip, rollback, stop) are taken from globally reduced values (`StepStats`),
so ranks never diverge.

The parts are small objects of their own, each given only its config section:
`Checkpointer` (checkpoint), `StabilityMonitor` (stability), `LRSchedule` and the optimizer
(optim), `StepRows` and `EventLog` (what is reported), `RollbackPlan` (where a rollback
goes), `Evaluator` (validation loss, given from outside like the model). `train()` builds the ESM3 model and loss and runs a `Trainer` with them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from esm3.model.config import flops_per_token
from esm3.model.esm3 import ESM3
from esm3.tokenize.tracks import CATEGORICAL_TRACKS, TrackSizes, check_track_sizes
from esm3.train import checkpoint as ckpt
from esm3.train.checkpointer import Checkpointer
from esm3.train.config import StageConfig, TrainConfig
from esm3.train.data import BatchBuilder, BatchSource, Dataset, TrainBatch
from esm3.train.faults import faulty_loss
from esm3.train.flops import peak_flops
from esm3.train.loss import ESM3Loss, LossFn, LossOutput
from esm3.train.optim import LRSchedule, build_optimizer, peak_lr, set_lr
from esm3.train.parallel import local_sq_norm, parallelize
from esm3.train.reporting import EventLog, Sinks, StepRows, StepTiming, now
from esm3.train.rollback import plan_rollback
from esm3.train.stability import StabilityMonitor, Verdict
from esm3.train.stats import StepStats, all_reduce
from esm3.train.validation import Evaluator, ValidationSet

__all__ = ["Sinks", "TrainModel", "TrainResult", "Trainer", "build_model", "train"]


@dataclass
class TrainResult:
    status: str  # completed | preempted
    step: int  # steps completed
    param_count: int
    peak_lr: float
    losses: dict[int, float] = field(default_factory=dict)  # step -> loss (this process)
    resumed_from: int | None = None
    checkpoint: str = ""


@dataclass
class TrainModel:
    """A model as the trainer needs it, built and parallelized by the caller.

    fingerprint: what a checkpoint must match to load; flops_per_token(seq_len): training
    FLOPs per token (MFU); tracks: the per-track losses reported as `loss_<track>`;
    metrics: other per-step values of the model (`LossOutput.metrics`)."""

    module: nn.Module
    param_count: int  # before sharding
    fingerprint: dict[str, Any]
    flops_per_token: Callable[[int], float]
    precision: str
    tracks: tuple[str, ...] = ()
    metrics: tuple[str, ...] = ()  # `LossOutput.metrics` names, reported per step


@dataclass
class Progress:
    """Where training stands: what a checkpoint restores and a step advances."""

    step: int = 0
    data_offset: int = 0  # data index = step + data_offset (grows when a rollback skips)
    tokens_seen: int = 0
    tokens_by_dataset: dict[str, int] = field(default_factory=dict)

    def restore(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.data_offset = int(state.get("data_offset", 0))
        self.tokens_seen = int(state.get("tokens_seen", 0))
        self.tokens_by_dataset = {**self.tokens_by_dataset, **state.get("tokens_by_dataset", {})}

    def advance(self, stats: StepStats) -> None:
        for name, n in stats.tokens_by_dataset.items():
            self.tokens_by_dataset[name] += n
        self.tokens_seen += stats.tokens
        self.step += 1


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_gather_object(obj: Any) -> list[Any]:
    rank, world = _rank_world()
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


class Trainer:
    """Trains `model` with `loss_fn` on `data`'s batches, from the latest checkpoint (or
    from scratch) to the end of the last stage (or `max_steps`)."""

    def __init__(
        self,
        cfg: TrainConfig,
        model: TrainModel,
        loss_fn: LossFn,
        data: BatchSource,
        *,
        run_id: str,
        ckpt_dir: str | Path,
        device: torch.device,
        sinks: Sinks | None = None,
        should_stop: Callable[[], bool] = lambda: False,
        attempt: int = 0,
        max_steps: int | None = None,
        evaluator: Evaluator | None = None,
    ) -> None:
        self.cfg = cfg
        self.evaluator = evaluator
        self.spec = model
        self.model = model.module
        built_for = getattr(getattr(model.module, "cfg", None), "tracks", None)
        if isinstance(built_for, TrackSizes):  # the model must read what the tokenizers write
            check_track_sizes(built_for, cfg.tasks.track_sizes())
        self.loss_fn = loss_fn
        self.data = data
        self.device = device
        self.should_stop = should_stop
        self.attempt = attempt
        self.sinks = sinks or Sinks()
        self.rank, self.world = _rank_world()
        self.run_id = run_id
        self.peak = peak_lr(cfg.optim, model.param_count)
        self.optimizer = build_optimizer(self.model, cfg.optim, lr=0.0)
        self.schedule = LRSchedule.from_config(cfg.optim, self.peak, cfg.total_steps)
        self.events = EventLog(run_id, self.rank, self.sinks.event)
        self.checkpointer = Checkpointer(
            cfg.checkpoint,
            ckpt_dir,
            self.model,
            self.optimizer,
            fingerprint=model.fingerprint,
            events=self.events,
            flush=self.sinks.flush,
            rank=self.rank,
            process_group=self._checkpoint_group(),
        )
        self.monitor = StabilityMonitor(cfg.stability)
        self.datasets = [d.name for d in cfg.data.datasets]
        self.rows = StepRows(
            run_id,
            attempt,
            cfg.log_every,
            cfg.optim.clip,
            list(model.tracks),
            list(model.metrics),
            device,
            self.world,
            peak_flops(device, cfg.parallel.peak_tflops),
            model.flops_per_token,
            self.sinks.step,
        )
        self.progress = Progress(tokens_by_dataset=dict.fromkeys(self.datasets, 0))
        total = cfg.total_steps
        self.end = min(total, max_steps) if max_steps else total
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.stage = -1  # the stage announced last (-1: announce the next one)
        self._t_last = 0.0

    def _checkpoint_group(self) -> Any:
        """Async saves run their collectives in a gloo group of their own."""
        distributed = dist.is_available() and dist.is_initialized()
        return (
            dist.new_group(backend="gloo")
            if distributed and self.cfg.checkpoint.async_save
            else None
        )

    # --- the run -----------------------------------------------------------------------

    def run(self) -> TrainResult:
        """Returns status "preempted" when `should_stop()` was true on any rank at a step
        boundary (a checkpoint was saved first), else "completed"."""
        resumed_from = self.resume()
        result = TrainResult(
            "completed",
            self.progress.step,
            self.spec.param_count,
            self.peak,
            resumed_from=resumed_from,
        )
        try:
            result.status = self._loop(result.losses)
        finally:
            self.checkpointer.finish_pending(prune_old=not self.monitor.in_streak)
        result.step = self.progress.step
        result.checkpoint = self.checkpointer.last_path
        return result

    def _loop(self, losses: dict[int, float]) -> str:
        p = self.progress
        batches = self._batches()
        while p.step < self.end:
            t_wait = time.perf_counter()
            batch = next(batches)
            data_wait = time.perf_counter() - t_wait
            assert batch.step == p.step and batch.data_step == p.step + p.data_offset, (
                batch.step,
                p.step,
            )
            stage = self._enter_stage(p.step)
            stats = self.train_step(batch)
            p.advance(stats)
            losses[p.step] = stats.loss
            self.rows.emit(
                p.step,
                self.end,
                self.rank,
                stage.name,
                stats,
                tokens_seen=p.tokens_seen,
                tokens_by_dataset=dict(p.tokens_by_dataset),  # a snapshot: async saves finish later
                timing=self._timing(data_wait),
                seq_len=batch.inputs["sequence"].shape[1],
            )
            if stats.verdict is not None and stats.verdict.rollback and self.roll_back():
                batches = self._batches()
                continue
            self.checkpointer.poll(prune_old=not self.monitor.in_streak)
            if stats.stop:
                self.preempt()  # no validation: the grace time is the checkpoint's
                return "preempted"
            if self.checkpointer.periodic_due(p.step, self.cfg.total_steps):
                self.save_checkpoint("periodic")
            self.validate(p.step)
        if p.step >= self.cfg.total_steps:
            self.save_checkpoint("final")
        return "completed"

    def _batches(self) -> Iterator[TrainBatch]:
        """Batches from the current step and data offset; the step clock starts afresh."""
        it = self.data.iterate(self.progress.step, self.end, self.progress.data_offset)
        self._t_last = time.perf_counter()
        return it

    def _timing(self, data_wait: float) -> StepTiming:
        t = time.perf_counter()
        dt, self._t_last = t - self._t_last, t
        return StepTiming(dt, data_wait)

    def _enter_stage(self, step: int) -> StageConfig:
        """The stage of `step`, announced when training enters it."""
        index, stage = self.cfg.stage_at(step)
        if step > 0 and self.cfg.stage_at(step - 1)[0] != index:
            self.monitor.reset_history()  # a new mix or track changes the loss: judge it afresh
        if index != self.stage:
            self.stage = index
            self.events(
                step,
                "stage",
                f"stage {stage.name!r}: context {stage.context_length}, tracks {','.join(stage.tracks)}",
                stage=stage.name,
                index=index,
                context_length=stage.context_length,
                tracks=stage.tracks,
                weights=self.data.stage_weights(index),
            )
        return stage

    # --- one step ----------------------------------------------------------------------

    def train_step(self, batch: TrainBatch) -> StepStats:
        """Forward, backward, clip; reduce what was measured over the ranks; judge it;
        update (unless the step was non-finite). Returns the world's stats of the step."""
        step = self.progress.step
        lr = self.schedule(step)
        set_lr(self.optimizer, lr)
        on_device = self._on_device(batch)
        out = self.model(**on_device.inputs)
        loss = self.loss_fn(out, on_device)
        loss.loss.backward()
        grad_norm = self._clip_gradients()
        stats = self._measure(batch, out, loss, grad_norm)
        stats = stats.all_reduce(self._reported(), self.datasets)
        stats.lr = lr
        stats.verdict = self.judge(step + 1, stats, batch)
        stats.skipped = stats.verdict.nonfinite
        stats.update_ratio = self._update(step + 1, skip=stats.skipped)
        return stats

    def _reported(self) -> list[str]:
        """Every per-step value reduced over the ranks: loss tracks, then metrics."""
        return [*self.spec.tracks, *self.spec.metrics]

    def _on_device(self, batch: TrainBatch) -> TrainBatch:
        def move(d: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {k: v.to(self.device, non_blocking=True) for k, v in d.items()}

        return replace(
            batch,
            inputs=move(batch.inputs),
            targets=move(batch.targets),
            loss_masks=move(batch.loss_masks),
        )

    def _clip_gradients(self) -> float:
        """The global gradient norm before clipping (FSDP: over every rank's shards)."""
        gn = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.optim.clip, foreach=True)
        gn = gn.full_tensor() if hasattr(gn, "full_tensor") else gn
        return float(gn)

    def _measure(
        self, batch: TrainBatch, out: Any, loss: LossOutput, grad_norm: float
    ) -> StepStats:
        """This rank's stats of the step (the stop flag asked once per step); a metric counts
        once per rank, so the reduction averages it over the ranks."""
        sums = {t: float(v) * loss.counts[t] for t, v in loss.per_track.items()}
        positions = {t: loss.counts[t] for t in loss.per_track}
        for name, v in loss.metrics.items():
            sums[name], positions[name] = float(v), 1
        return StepStats(
            loss=float(loss.loss.detach()),
            grad_norm=grad_norm,
            tokens=batch.n_tokens,
            padding_fraction=batch.padding_fraction,
            tokens_by_dataset={n: batch.tokens_by_dataset.get(n, 0) for n in self.datasets},
            track_loss_sum=sums,
            track_positions=positions,
            max_attn_logit=_max_attn_logit(out),
            stop=bool(self.should_stop()),
        )

    def judge(self, step: int, stats: StepStats, batch: TrainBatch) -> Verdict:
        """The stability verdict of step `step` (1-based), reported as events; an abort
        stops the run."""
        v = self.monitor.observe(step, stats.loss, stats.grad_norm)
        if v.abort:
            self.events(step, "abort", v.abort, "error")
            raise RuntimeError(f"training stopped at step {step}: {v.abort}")
        if v.nonfinite:
            self.events(
                step,
                "nonfinite",
                f"loss {stats.loss} / grad norm {stats.grad_norm}: update skipped",
                "warning",
                value=stats.loss,
                data_step=batch.data_step,
                fault=batch.fault,
                total=self.monitor.nonfinite_total,
            )
        if v.spike:
            which = "loss" if v.loss_spike else "grad norm"
            self.events(
                step,
                "spike",
                f"{which} spike: loss {stats.loss:.4g} (median {v.loss_median:.4g}), "
                f"grad norm {stats.grad_norm:.4g} (median {v.grad_median:.4g})",
                "warning",
                value=stats.loss,
                loss_spike=v.loss_spike,
                grad_spike=v.grad_spike,
                loss_median=v.loss_median,
                grad_median=v.grad_median,
                data_step=batch.data_step,
            )
        return v

    def _update(self, step: int, *, skip: bool) -> float:
        """The optimizer step (none when `skip`); returns the update-to-weight ratio where
        measured this step (`update_ratio_every`), else NaN."""
        if skip:
            self.optimizer.zero_grad(set_to_none=True)
            return math.nan
        every = self.cfg.update_ratio_every
        before = [p.detach().clone() for p in self.params] if every and step % every == 0 else None
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if before is None:
            return math.nan
        with torch.no_grad():
            delta = local_sq_norm([p - b for p, b in zip(self.params, before, strict=True)])
            norm = local_sq_norm(self.params)
        dn = all_reduce(torch.stack([delta, norm]).double())
        return math.sqrt(float(dn[0]) / max(float(dn[1]), 1e-30))

    def validate(self, step: int) -> None:
        """The validation event of step `step` where one is due (collective); its time is
        left out of the next step's."""
        if self.evaluator is None or not self.evaluator.due(step, self.end):
            return
        t0 = time.perf_counter()
        res = self.evaluator.evaluate(self.model, step)
        seconds = time.perf_counter() - t0
        self.events(
            step, "validation", res.message(), value=res.loss, **res.detail(), seconds=seconds
        )
        self._t_last += seconds

    # --- checkpoints, resume, rollback, preemption -------------------------------------

    def resume(self) -> int | None:
        """Restore the latest checkpoint (or load `init_from` weights); the step resumed
        from, None for a fresh start (announced with the `start` event)."""
        found = self.checkpointer.load_latest(0) if self.cfg.checkpoint.resume else None
        if found is not None:
            path, state = found
            self._restore(state)
            step = self.progress.step
            self.events(
                step,
                "resume",
                f"resumed from {path.name} (attempt {self.attempt})",
                value=float(step),
                path=str(path),
                attempt=self.attempt,
            )
            return step
        if self.cfg.checkpoint.init_from:
            self.checkpointer.load_initial_weights()
        self._announce_start()
        return None

    def _announce_start(self) -> None:
        o, n = self.cfg.optim, self.spec.param_count
        scaled = f" (base {o.base_lr:g} x sqrt({o.reference_params:,}/{n:,}))" if o.scale_lr else ""
        self.events(
            0,
            "start",
            f"{n:,} parameters, peak LR {self.peak:.3g}" + scaled,
            value=self.peak,
            param_count=n,
            world_size=self.world,
            precision=self.spec.precision,
            device=str(self.device),
        )

    def _restore(self, state: dict[str, Any], *, rolling_back: bool = False) -> None:
        self.progress.restore(state)
        if "stability" in state:
            self.monitor.load_state_dict(state["stability"], keep_rollbacks=rolling_back)

    def train_state(self) -> dict[str, Any]:
        """What a checkpoint records besides the weights (collective: every rank's loader)."""
        p = self.progress
        stage_index, stage = self.cfg.stage_at(max(p.step - 1, 0))
        loaders = _all_gather_object(self.data.loader_state(stage_index))
        return dict(
            step=p.step,
            data_offset=p.data_offset,
            tokens_seen=p.tokens_seen,
            tokens_by_dataset=dict(p.tokens_by_dataset),  # a snapshot: async saves finish later
            stability=self.monitor.state_dict(),
            stage=stage.name,
            model=self.spec.fingerprint,
            param_count=self.spec.param_count,
            world_size=self.world,
            run_id=self.run_id,
            attempt=self.attempt,
            loaders=[{**s, "step": p.step + p.data_offset} for s in loaders],
            time=now().isoformat(),
        )

    def save_checkpoint(self, reason: str) -> None:
        """Save now, unless in a non-finite streak (its weights may be the cause)."""
        step = self.progress.step
        if self.monitor.in_streak:
            self.events(
                step,
                "checkpoint_skipped",
                f"no {reason} checkpoint during a non-finite streak "
                f"({self.monitor.nonfinite_run} step(s))",
                "warning",
                reason=reason,
            )
            return
        self.checkpointer.save(
            step, reason, lambda: {**self.train_state(), "clean": self.monitor.checkpointed()}
        )

    def roll_back(self) -> bool:
        """Return to a checkpoint from before the spike burst, skipping its batches (PaLM);
        False when there is none to return to."""
        p = self.progress
        plan = plan_rollback(
            p.step, p.data_offset, list(self.monitor.spike_steps), self.checkpointer.steps()
        )
        if plan is None:
            self.events(
                p.step, "rollback", "rollback wanted but no checkpoint to return to", "warning"
            )
            return False
        self.checkpointer.finish_pending()
        found = self.checkpointer.load_latest(p.step, max_step=plan.max_step)
        if found is None:
            raise RuntimeError(f"rollback from step {p.step}: no checkpoint could be loaded")
        path, state = found
        self._restore(state, rolling_back=True)
        self.monitor.rolled_back()
        restored_offset = p.data_offset
        p.data_offset = plan.resume_offset(p.step)
        self.events(
            p.step,
            "rollback",
            plan.message(path.name, p.step, restored_offset),
            "error",
            value=float(plan.from_step),
            to_step=p.step,
            from_step=plan.from_step,
            skipped=plan.skipped(p.step, restored_offset),
            rollbacks=self.monitor.rollbacks,
        )
        self.stage = -1
        return True

    def preempt(self) -> None:
        self.save_checkpoint("preemption")
        self.events(
            self.progress.step,
            "preempt",
            "stop requested (preemption or time limit): checkpoint saved",
            "warning",
        )


def _max_attn_logit(out: Any) -> float:
    """The largest attention logit of the step (-inf where the model tracks none)."""
    mx = getattr(out, "max_attn_logit", None)
    if mx is None or not mx.numel():
        return -math.inf
    return float(torch.nan_to_num(mx.detach().float(), nan=-math.inf).max())


# --- the ESM3 model ---------------------------------------------------------------------


def build_model(cfg: TrainConfig, device: torch.device) -> tuple[ESM3, int]:
    """The model on `device` with its parameter count (before sharding)."""
    torch.manual_seed(cfg.seed)  # same initial weights on every rank and attempt
    model = ESM3(cfg.model_config(), device=device).to(device)
    return model, sum(p.numel() for p in model.parameters())


def esm3_train_model(cfg: TrainConfig, device: torch.device, *, distributed: bool) -> TrainModel:
    """The config's ESM3, parallelized (FSDP2 when distributed, activation checkpointing)."""
    mcfg = cfg.model_config()
    module, n_params = build_model(cfg, device)
    module, precision = parallelize(module, cfg.parallel, device, distributed=distributed)
    return TrainModel(
        module,
        n_params,
        ckpt.fingerprint(mcfg),
        partial(flops_per_token, mcfg),
        precision,
        tuple(CATEGORICAL_TRACKS),
    )


def train(
    cfg: TrainConfig,
    datasets: dict[str, Dataset],
    *,
    run_id: str,
    ckpt_dir: str | Path,
    device: torch.device | None = None,
    sinks: Sinks | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    attempt: int = 0,
    max_steps: int | None = None,
    validation: ValidationSet | None = None,
) -> TrainResult:
    """Train the config's ESM3 from the latest checkpoint (or from scratch) to the end of
    the last stage. `max_steps` stops early (benchmarks) without the final checkpoint.
    `validation`: the records `validation.load_validation` chose (evaluated every
    `validation.every` steps when given)."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rank, world = _rank_world()
    per_rank = cfg.check_world_size(world)
    if cfg.parallel.threads:
        torch.set_num_threads(cfg.parallel.threads)
    distributed = dist.is_available() and dist.is_initialized()
    if cfg.model.is_vqvae:  # the structure tokenizer
        from esm3.train.vqvae import QUALITY, VQVAELoss, vqvae_train_model

        model = vqvae_train_model(cfg, device, distributed=distributed)
        loss: LossFn = VQVAELoss(cfg.model_config())
        weights, reported = loss.weights, (*model.tracks, *QUALITY)
    else:
        model = esm3_train_model(cfg, device, distributed=distributed)
        loss = ESM3Loss(cfg.loss_weights)
        weights, reported = dict(cfg.loss_weights), model.tracks
    data = BatchSource(BatchBuilder(cfg, datasets, rank=rank, per_rank=per_rank))
    loss_fn = faulty_loss(loss, cfg.stability)
    evaluator = None
    if validation is not None and cfg.validation.every:
        evaluator = Evaluator(
            cfg, validation, loss, device, tracks=reported, weights=weights, rank=rank,
            world=world,
        )  # fmt: skip
    trainer = Trainer(
        cfg,
        model,
        loss_fn,
        data,
        run_id=run_id,
        ckpt_dir=ckpt_dir,
        device=device,
        sinks=sinks,
        should_stop=should_stop,
        attempt=attempt,
        max_steps=max_steps,
        evaluator=evaluator,
    )
    return trainer.run()
