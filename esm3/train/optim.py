"""AdamW and the learning-rate schedule of the paper (A.2.3).

Linear warmup to the peak, then cosine decay to `min_ratio` of the peak at the last step.
The peak can be derived from a base LR tuned on a small model, scaled by
1/sqrt(parameters) (the paper's "learning rate scaled inversely with the square root of the
parameter count").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from esm3.train.config import OptimConfig


def lr_at(step: int, *, peak: float, warmup: int, total: int, min_ratio: float = 0.1) -> float:
    """LR of optimizer step `step` (0-based).

    Warmup: peak * (step + 1) / warmup for step < warmup. Then cosine from peak (at step
    `warmup`) to min_ratio * peak (at step total - 1); min_ratio * peak beyond.
    """
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    span = max(total - 1 - warmup, 1)
    t = min(max(step - warmup, 0) / span, 1.0)
    return peak * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t)))


def scaled_peak_lr(base_lr: float, params: int, reference_params: int) -> float:
    """base_lr * sqrt(reference_params / params): the peak LR for a model of `params`
    parameters, from a base LR tuned on one of `reference_params`."""
    if params <= 0 or reference_params <= 0:
        raise ValueError(f"parameter counts must be > 0, got {params} and {reference_params}")
    return base_lr * math.sqrt(reference_params / params)


def peak_lr(cfg: OptimConfig, params: int) -> float:
    return scaled_peak_lr(cfg.base_lr, params, cfg.reference_params) if cfg.scale_lr else cfg.lr


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: matrices decay; biases, norm weights and embeddings do not."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or "embed" in name or "norm" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: OptimConfig, lr: float) -> torch.optim.AdamW:
    """AdamW(beta1, beta2, eps, weight decay) over the model's parameters (after sharding:
    FSDP2's DTensor parameters are optimized shard by shard)."""
    fused = None
    if any(p.is_cuda for p in model.parameters()):
        fused = True
    opt = torch.optim.AdamW(
        param_groups(model, cfg.weight_decay),
        lr=lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        fused=fused,
    )
    init_state(opt)
    return opt


def init_state(opt: torch.optim.AdamW) -> None:
    """Create AdamW's state for every parameter now (step 0, zero moments), exactly what its
    first step would create, so that every checkpoint holds the same keys even when some
    parameters have not had a gradient yet (a head whose track a stage leaves out)."""
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state[p]
            if st:
                continue
            dev = p.device if group.get("fused") or group.get("capturable") else "cpu"
            st["step"] = torch.zeros((), dtype=torch.float32, device=dev)
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr


@dataclass(frozen=True)
class LRSchedule:
    """The LR of every optimizer step of a run: `lr_at` with the run's peak and length."""

    peak: float
    warmup: int
    total: int
    min_ratio: float

    @classmethod
    def from_config(cls, cfg: OptimConfig, peak: float, total: int) -> LRSchedule:
        return cls(peak, cfg.warmup_steps, total, cfg.min_lr_ratio)

    def __call__(self, step: int) -> float:
        return lr_at(
            step, peak=self.peak, warmup=self.warmup, total=self.total, min_ratio=self.min_ratio
        )
