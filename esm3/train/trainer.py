"""The training loop: model, FSDP2, AdamW, stages, checkpoints, stability, per-step metrics.

No SLURM or file-layout knowledge: the caller gives the checkpoint folder, the data root,
the sinks for `train_steps` and `events` rows (rank 0 writes them), and a `should_stop`
flag (the preemption signal). Every rank runs `train`; all decisions that change control
flow (skip, rollback, stop) are taken from globally reduced values, so ranks never diverge.
"""

from __future__ import annotations

import json
import logging
import math
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from esm3.model.config import flops_per_token
from esm3.model.esm3 import ESM3
from esm3.model.loss import LossConfig, track_losses
from esm3.tokenize.tracks import CATEGORICAL_TRACKS
from esm3.train import checkpoint as ckpt
from esm3.train.config import TrainConfig
from esm3.train.data import BatchBuilder, Dataset, batches
from esm3.train.flops import peak_flops
from esm3.train.optim import build_optimizer, lr_at, peak_lr, set_lr
from esm3.train.parallel import local_sq_norm, parallelize
from esm3.train.stability import StabilityMonitor

log = logging.getLogger("esm3.train")

Row = dict[str, Any]


@dataclass
class Sinks:
    """Where rank 0's rows go (train_steps rows, events rows); no-ops by default.

    `flush` makes every row given so far durable; it runs before a checkpoint is declared."""

    step: Callable[[Row], None] = lambda r: None
    event: Callable[[Row], None] = lambda r: None
    flush: Callable[[], None] = lambda: None


@dataclass
class TrainResult:
    status: str  # completed | preempted
    step: int  # steps completed
    param_count: int
    peak_lr: float
    losses: dict[int, float] = field(default_factory=dict)  # step -> loss (this process)
    resumed_from: int | None = None
    checkpoint: str = ""


def _now() -> datetime:
    return datetime.now(UTC)


def _allreduce(t: torch.Tensor, op: Any = None) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


def _all_gather_object(obj: Any) -> list[Any]:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def build_model(cfg: TrainConfig, device: torch.device) -> tuple[ESM3, int]:
    """The model on `device` with its parameter count (before sharding)."""
    torch.manual_seed(cfg.seed)  # same initial weights on every rank and attempt
    model = ESM3(cfg.model_config(), device=device).to(device)
    return model, sum(p.numel() for p in model.parameters())


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
) -> TrainResult:
    """Train from the latest checkpoint (or from scratch) to the end of the last stage.

    Returns status "preempted" when `should_stop()` was true on any rank at a step
    boundary (a checkpoint was saved first), else "completed". `max_steps` stops early
    (benchmarks) without the final checkpoint.
    """
    sinks = sinks or Sinks()
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    per_rank = cfg.check_world_size(world)
    if cfg.parallel.threads:
        torch.set_num_threads(cfg.parallel.threads)
    mcfg = cfg.model_config()
    fp = ckpt.fingerprint(mcfg)

    def event(
        step: int,
        kind: str,
        message: str,
        severity: str = "info",
        value: float | None = None,
        **detail: Any,
    ) -> None:
        if rank == 0:
            sinks.event(
                dict(
                    run_id=run_id,
                    step=step,
                    kind=kind,
                    severity=severity,
                    message=message,
                    value=value,
                    detail=json.dumps(detail, default=str) if detail else None,
                    time=_now(),
                )
            )
        log.info("[%s] step %d: %s", kind, step, message)

    model, n_params = build_model(cfg, device)
    model, precision = parallelize(model, cfg.parallel, device, distributed=distributed)
    peak = peak_lr(cfg.optim, n_params)
    opt = build_optimizer(model, cfg.optim, lr=0.0)
    ckpt_pg = (
        dist.new_group(backend="gloo") if (distributed and cfg.checkpoint.async_save) else None
    )
    monitor = StabilityMonitor(cfg.stability)
    total = cfg.total_steps
    end = min(total, max_steps) if max_steps else total

    step, data_offset, tokens_seen = 0, 0, 0
    by_ds = {d.name: 0 for d in cfg.data.datasets}
    resumed_from: int | None = None

    def restore(state: dict[str, Any], *, rolling_back: bool = False) -> None:
        nonlocal step, data_offset, tokens_seen, by_ds
        step = int(state["step"])
        data_offset = int(state.get("data_offset", 0))
        tokens_seen = int(state.get("tokens_seen", 0))
        by_ds = {**by_ds, **state.get("tokens_by_dataset", {})}
        if "stability" in state:
            monitor.load_state_dict(state["stability"], keep_rollbacks=rolling_back)

    def on_bad_ckpt(path: Path, reason: str) -> None:
        event(
            step,
            "checkpoint_corrupt",
            f"{path.name} refused, falling back: {reason}",
            "warning",
            path=str(path),
        )

    found = None
    if cfg.checkpoint.resume:
        found = ckpt.load_latest(
            ckpt_dir, model, opt, expected_model=fp, on_failure=on_bad_ckpt, process_group=ckpt_pg
        )
    if found is not None:
        path, state = found
        restore(state)
        resumed_from = step
        event(
            step,
            "resume",
            f"resumed from {path.name} (attempt {attempt})",
            value=float(step),
            path=str(path),
            attempt=attempt,
        )
    elif cfg.checkpoint.init_from:
        state = ckpt.read_state(cfg.checkpoint.init_from)
        ckpt.check_compatible(state, fp, cfg.checkpoint.init_from)
        ckpt.load(cfg.checkpoint.init_from, model, None, process_group=ckpt_pg)
        event(0, "init", f"weights from {cfg.checkpoint.init_from}")
    if resumed_from is None:
        event(
            0,
            "start",
            f"{n_params:,} parameters, peak LR {peak:.3g}"
            + (
                f" (base {cfg.optim.base_lr:g} x sqrt({cfg.optim.reference_params:,}/{n_params:,}))"
                if cfg.optim.scale_lr
                else ""
            ),
            value=peak,
            param_count=n_params,
            world_size=world,
            precision=precision,
            device=str(device),
        )

    builder = BatchBuilder(cfg, datasets, rank=rank, per_rank=per_rank)
    fpt_cache: dict[int, float] = {}
    device_peak = peak_flops(device, cfg.parallel.peak_tflops)
    loss_cfg = LossConfig(weights=dict(cfg.loss_weights))
    params = [p for p in model.parameters() if p.requires_grad]
    names = [d.name for d in cfg.data.datasets]
    tracks = list(CATEGORICAL_TRACKS)
    result = TrainResult("completed", step, n_params, peak, resumed_from=resumed_from)
    pending: ckpt.PendingSave | None = None
    current_stage = -1 if resumed_from is None else cfg.stage_at(step)[0]
    if resumed_from is not None and step < end:
        current_stage = -1  # announce the stage this attempt trains in

    def train_state() -> dict[str, Any]:
        loaders = _all_gather_object(
            builder.sampler(cfg.stage_at(max(step - 1, 0))[0]).state_dict()
        )
        return dict(
            step=step,
            data_offset=data_offset,
            tokens_seen=tokens_seen,
            tokens_by_dataset=by_ds,
            stability=monitor.state_dict(),
            stage=cfg.stage_at(max(step - 1, 0))[1].name,
            model=fp,
            param_count=n_params,
            world_size=world,
            run_id=run_id,
            attempt=attempt,
            loaders=[{**s, "step": step + data_offset} for s in loaders],
            time=_now().isoformat(),
        )

    def save(reason: str) -> None:
        nonlocal pending
        if monitor.in_streak:
            event(
                step,
                "checkpoint_skipped",
                f"no {reason} checkpoint during a non-finite streak "
                f"({monitor.nonfinite_run} step(s))",
                "warning",
                reason=reason,
            )
            return
        if pending is not None:
            pending.finish()
            pending = None
        t0 = time.perf_counter()
        st = {**train_state(), "clean": monitor.checkpointed()}
        name = ckpt.step_dir(ckpt_dir, step).name
        saved_at = step

        def declare() -> None:  # the saved event and all rows so far, durable before the manifest
            event(
                saved_at,
                "checkpoint",
                f"saved {name} ({reason})",
                value=time.perf_counter() - t0,
                path=str(ckpt.step_dir(ckpt_dir, saved_at)),
                reason=reason,
                clean=st["clean"],
            )
            sinks.flush()

        p = ckpt.save(
            ckpt_dir,
            step,
            model,
            opt,
            st,
            rank=rank,
            keep=cfg.checkpoint.keep,
            async_save=cfg.checkpoint.async_save and reason == "periodic",
            process_group=ckpt_pg,
            before_commit=declare,
        )
        if not p.finished:
            pending = p
        result.checkpoint = str(p.path)

    it = batches(
        builder, step, end, data_offset, workers=cfg.data.workers, prefetch=cfg.data.prefetch
    )
    t_last = time.perf_counter()
    try:
        while step < end:
            t_wait = time.perf_counter()
            batch = next(it)
            data_wait = time.perf_counter() - t_wait
            assert batch.step == step and batch.data_step == step + data_offset, (batch.step, step)
            stage_idx, stage = cfg.stage_at(step)
            if step > 0 and cfg.stage_at(step - 1)[0] != stage_idx:
                monitor.reset_history()  # a new mix or track changes the loss: judge it afresh
            if stage_idx != current_stage:
                current_stage = stage_idx
                event(
                    step,
                    "stage",
                    f"stage {stage.name!r}: context {stage.context_length}, tracks {','.join(stage.tracks)}",
                    stage=stage.name,
                    index=stage_idx,
                    context_length=stage.context_length,
                    tracks=stage.tracks,
                    weights=builder.sampler(stage_idx).weights.tolist(),
                )
            lr = lr_at(
                step,
                peak=peak,
                warmup=cfg.optim.warmup_steps,
                total=total,
                min_ratio=cfg.optim.min_lr_ratio,
            )
            set_lr(opt, lr)
            inputs = {k: v.to(device, non_blocking=True) for k, v in batch.inputs.items()}
            targets = {k: v.to(device, non_blocking=True) for k, v in batch.targets.items()}
            masks = {k: v.to(device, non_blocking=True) for k, v in batch.loss_masks.items()}
            out = model(**inputs)
            loss, per_track, counts = track_losses(out.logits, targets, masks, loss_cfg)
            # every head must get a gradient on every rank (zero where its track is not in
            # this rank's loss): FSDP2 reduce-scatters only parameters with gradients, and
            # ranks disagreeing on that set would mismatch their collectives
            unused = [lg for t, lg in out.logits.items() if t not in per_track]
            if unused:
                loss = loss + 0.0 * sum(lg.float().sum() for lg in unused)
            if batch.fault == "nan":
                loss = loss * float("nan")
            elif batch.fault == "spike":
                loss = loss * cfg.stability.spike_scale
            loss.backward()
            gn = torch.nn.utils.clip_grad_norm_(params, cfg.optim.clip, foreach=True)
            gn = gn.full_tensor() if hasattr(gn, "full_tensor") else gn
            grad_norm = float(gn)
            # one all-reduce for everything the step reports and decides on
            vec = torch.zeros(4 + 2 * len(tracks) + len(names), dtype=torch.float64)
            vec[0] = float(loss.detach())
            vec[1] = float(should_stop())
            vec[2] = batch.n_tokens
            vec[3] = batch.padding_fraction
            for i, t in enumerate(tracks):
                if t in per_track:
                    vec[4 + 2 * i] = float(per_track[t]) * counts[t]
                    vec[5 + 2 * i] = counts[t]
            for j, n in enumerate(names):
                vec[4 + 2 * len(tracks) + j] = batch.tokens_by_dataset.get(n, 0)
            _allreduce(vec)
            mx = out.max_attn_logit.detach().float()
            mx = (
                torch.nan_to_num(mx, nan=-math.inf).max() if mx.numel() else torch.tensor(-math.inf)
            )
            mx = _allreduce(mx.reshape(1).cpu(), dist.ReduceOp.MAX if distributed else None)
            g_loss = float(vec[0]) / world
            stop = bool(vec[1] > 0)
            verdict = monitor.observe(step + 1, g_loss, grad_norm)
            if verdict.abort:
                event(step + 1, "abort", verdict.abort, "error")
                raise RuntimeError(f"training stopped at step {step + 1}: {verdict.abort}")
            update_ratio = math.nan
            if verdict.nonfinite:
                opt.zero_grad(set_to_none=True)
                event(
                    step + 1,
                    "nonfinite",
                    f"loss {g_loss} / grad norm {grad_norm}: update skipped",
                    "warning",
                    value=g_loss,
                    data_step=batch.data_step,
                    fault=batch.fault,
                    total=monitor.nonfinite_total,
                )
            else:
                track_ratio = cfg.update_ratio_every and (step + 1) % cfg.update_ratio_every == 0
                before = [p.detach().clone() for p in params] if track_ratio else None
                opt.step()
                opt.zero_grad(set_to_none=True)
                if before is not None:
                    with torch.no_grad():
                        delta = local_sq_norm([p - b for p, b in zip(params, before, strict=True)])
                        norm = local_sq_norm(params)
                    dn = _allreduce(torch.stack([delta, norm]).double())
                    update_ratio = math.sqrt(float(dn[0]) / max(float(dn[1]), 1e-30))
            if verdict.spike:
                which = "loss" if verdict.loss_spike else "grad norm"
                event(
                    step + 1,
                    "spike",
                    f"{which} spike: loss {g_loss:.4g} (median {verdict.loss_median:.4g}), "
                    f"grad norm {grad_norm:.4g} (median {verdict.grad_median:.4g})",
                    "warning",
                    value=g_loss,
                    loss_spike=verdict.loss_spike,
                    grad_spike=verdict.grad_spike,
                    loss_median=verdict.loss_median,
                    grad_median=verdict.grad_median,
                    data_step=batch.data_step,
                )
            step_tokens = int(vec[2])
            for j, n in enumerate(names):
                by_ds[n] += int(vec[4 + 2 * len(tracks) + j])
            tokens_seen += step_tokens
            step += 1
            now = time.perf_counter()
            dt = now - t_last
            t_last = now
            if batch.inputs["sequence"].shape[1] not in fpt_cache:
                fpt_cache[batch.inputs["sequence"].shape[1]] = flops_per_token(
                    mcfg, batch.inputs["sequence"].shape[1]
                )
            fpt = fpt_cache[batch.inputs["sequence"].shape[1]]
            mfu = (fpt * step_tokens / dt / (device_peak * world)) if device_peak else None
            result.losses[step] = g_loss
            if rank == 0 and (step % cfg.log_every == 0 or step == end):
                row: Row = dict(
                    run_id=run_id,
                    step=step,
                    attempt=attempt,
                    stage=stage.name,
                    loss=g_loss,
                    lr=lr,
                    grad_norm=grad_norm,
                    clipped=bool(grad_norm > cfg.optim.clip),
                    skipped=verdict.nonfinite,
                    update_ratio=None if math.isnan(update_ratio) else update_ratio,
                    max_attn_logit=None if not math.isfinite(float(mx[0])) else float(mx[0]),
                    tokens=step_tokens,
                    tokens_seen=tokens_seen,
                    tokens_by_dataset=json.dumps(by_ds, sort_keys=True),
                    step_time_s=dt,
                    data_wait_s=data_wait,
                    tokens_per_s=step_tokens / dt if dt > 0 else None,
                    mfu=mfu,
                    mem_peak_gb=_peak_mem_gb(device),
                    time=_now(),
                )
                for i, t in enumerate(tracks):
                    row[f"loss_{t}"] = (
                        float(vec[4 + 2 * i] / vec[5 + 2 * i]) if vec[5 + 2 * i] > 0 else None
                    )
                sinks.step(row)
            if verdict.rollback:
                # PaLM: return to a checkpoint from before the burst's first spike
                first_spike = monitor.spike_steps[0]
                last = ckpt.list_checkpoints(ckpt_dir)
                target = [s for s, _ in last if s < first_spike]
                if not target:
                    event(
                        step,
                        "rollback",
                        "rollback wanted but no checkpoint to return to",
                        "warning",
                    )
                else:
                    if pending is not None:
                        pending.finish()
                        pending = None
                    bad_from = step  # the offending batches: data indices up to this step's
                    bad_data = step - 1 + data_offset
                    path, state = ckpt.load_latest(
                        ckpt_dir,
                        model,
                        opt,
                        expected_model=fp,
                        on_failure=on_bad_ckpt,
                        process_group=ckpt_pg,
                        max_step=first_spike - 1,
                    )
                    restore(state, rolling_back=True)
                    monitor.rolled_back()
                    skipped = bad_data + 1 - (step + data_offset)
                    data_offset = bad_data + 1 - step
                    event(
                        step,
                        "rollback",
                        f"rolled back from step {bad_from} to {path.name}, skipping "
                        f"{skipped} batch(es) (data {step + int(state.get('data_offset', 0))}..{bad_data})",
                        "error",
                        value=float(bad_from),
                        to_step=step,
                        from_step=bad_from,
                        skipped=skipped,
                        rollbacks=monitor.rollbacks,
                    )
                    it = batches(
                        builder,
                        step,
                        end,
                        data_offset,
                        workers=cfg.data.workers,
                        prefetch=cfg.data.prefetch,
                    )
                    current_stage = -1
                    t_last = time.perf_counter()
                    continue
            if pending is not None and pending.done():
                pending.finish(prune_old=not monitor.in_streak)
                pending = None
            if stop:
                save("preemption")
                event(
                    step,
                    "preempt",
                    "stop requested (preemption or time limit): checkpoint saved",
                    "warning",
                )
                result.status = "preempted"
                break
            if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and step < total:
                save("periodic")
        else:
            if step >= total:
                save("final")
    finally:
        if pending is not None:
            pending.finish(prune_old=not monitor.in_streak)
    result.step = step
    return result


def _peak_mem_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (process peak)
