"""FSDP2 and activation checkpointing, applied to the model from outside (torchtitan style).

The model's math (`esm3.model.esm3.ESM3`) knows nothing of distribution; `parallelize`
wraps each block of `model.layers` (activation checkpointing, then `fully_shard`) and
finally the root, so parameters outside the blocks (embeddings, heads, final norm) form
the root's group. With BF16 (the default on CUDA; on CPU only when asked, to test the
path), parameters are all-gathered and computed in BF16 and gradients reduced in FP32 into
FP32 shards (MixedPrecisionPolicy); otherwise everything is FP32.
"""

from __future__ import annotations

import logging
import warnings

import torch
from torch import nn

from esm3.train.config import ParallelConfig

log = logging.getLogger(__name__)

# FSDP2 warns at every forward that the model returns a view (the function track's logits,
# (B, T, 8, V) viewed from one head's output): harmful only if the output were modified in
# place, which neither the losses nor the evaluation do.
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")


def resolve_precision(cfg: ParallelConfig, device: torch.device) -> str:
    """ "bf16" or "fp32": auto is bf16 on CUDA, fp32 elsewhere; bf16 asked for is honoured
    on any device, so the GPU's mixed-precision path runs in CPU tests too."""
    if cfg.precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return cfg.precision


def apply_activation_checkpointing(model: nn.Module) -> int:
    """Wrap every block of `model.layers` so its activations are recomputed in backward.

    Returns the number of blocks wrapped. Checkpoint FQNs are cleaned by
    torch.distributed.checkpoint's state-dict helpers, so checkpoints stay interchangeable.
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl,
        checkpoint_wrapper,
    )

    layers = model.layers  # type: ignore[attr-defined]
    for i, block in enumerate(layers):
        layers[i] = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
    return len(layers)


def parallelize(
    model: nn.Module,
    cfg: ParallelConfig,
    device: torch.device,
    *,
    distributed: bool = True,
) -> tuple[nn.Module, str]:
    """Apply FP8 via torchao (`esm3.train.float8`, by config), activation checkpointing (by
    config) and FSDP2 per block and at the root.

    `model` must already be on `device`. Returns (model, precision). With
    `distributed=False` (no process group) only activation checkpointing is applied.
    """
    precision = resolve_precision(cfg, device)
    if cfg.fp8:  # before checkpointing and sharding wrap the blocks (torchtitan's order)
        from esm3.train import float8

        converted, skipped = float8.apply(model, device)
        if converted or skipped:
            log.info("FP8 (torchao): %d linear layers converted, %d skipped", converted, skipped)
    if cfg.activation_checkpointing:
        n = apply_activation_checkpointing(model)
        log.info("activation checkpointing on %d blocks", n)
    if not distributed:
        if precision == "bf16":  # the policy below is what makes BF16: it needs FSDP
            log.warning("BF16 mixed precision needs FSDP (a process group); running FP32")
        return model, "fp32"
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # No input cast: FSDP would cast every float input of each block to bf16, the blocks'
    # float32 context too (frames, Angstrom translations, the float32-lowest geometric
    # mask, which becomes -inf: NaN gradients on every step, all updates skipped). The
    # model takes bf16 from its gathered parameters instead (embeddings on), the geometry
    # stays float32. Gradients are reduce-scattered in float32, into float32 shards (a
    # choice for the numerics: gloo all-gathers and reduce-scatters bf16 as well).
    mp = (
        MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False
        )
        if precision == "bf16"
        else MixedPrecisionPolicy()
    )
    layers = model.layers  # type: ignore[attr-defined]
    for i, block in enumerate(layers):
        # the last block's parameters are needed again at once by backward: keep them
        reshard = cfg.reshard_after_forward and i < len(layers) - 1
        fully_shard(block, mp_policy=mp, reshard_after_forward=reshard)
    fully_shard(model, mp_policy=mp, reshard_after_forward=cfg.reshard_after_forward)
    return model, precision


def local_sq_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Sum of squares of the local shards (DTensors: `to_local()`), FP32 scalar."""
    total = torch.zeros((), dtype=torch.float32)
    for t in tensors:
        loc = t.to_local() if hasattr(t, "to_local") else t
        total = total + loc.detach().float().pow(2).sum().cpu()
    return total
