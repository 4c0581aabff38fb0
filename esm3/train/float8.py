"""FP8 training through torchao's float8 (torchtitan's FP8 path), beside TransformerEngine's.

With `parallel.fp8 = true` and `model.linear = "torch"`, every nn.Linear inside the
transformer blocks (`model.layers`) becomes torchao's Float8Linear: dynamic tensorwise
scaling, E4M3 forward, E5M2 gradients, matmuls on torch._scaled_mm. It is applied before
activation checkpointing and `fully_shard`, as torchtitan does. Layers outside the blocks
(embeddings, output heads), geometric attention's (it computes in float32 on purpose) and
layers whose dimensions are not multiples of 16 (what _scaled_mm needs) stay as they are. `model.linear = "te"` keeps TransformerEngine's path.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import nn

from esm3.model.geometry import GeometricAttention
from esm3.train.config import TrainConfigError

#: The torchao release made for torch 2.11 (its float8 training is pure Python).
TORCHAO_SPEC = "torchao==0.17.0"
#: torch._scaled_mm needs FP8 tensor cores: Ada (8.9) or Hopper (9.0) and newer.
MIN_CAPABILITY = (8, 9)
_KEY = "config key 'parallel.fp8'"


class Float8Unavailable(TrainConfigError):
    """FP8 through torchao cannot run here; the message says what to change."""


def unavailable_reason(device: torch.device) -> str | None:
    """Why torchao float8 training cannot run on `device`, or None when it can."""
    if importlib.util.find_spec("torchao") is None:
        return f"torchao is not installed (pip install '{TORCHAO_SPEC}')"
    if device.type != "cuda":
        return f"needs a CUDA GPU with compute capability >= 8.9, the device is {device.type}"
    cap = torch.cuda.get_device_capability(device)
    if cap < MIN_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        return f"needs compute capability >= 8.9 (Ada/Hopper), {name} has {cap[0]}.{cap[1]}"
    return None


def require(device: torch.device) -> None:
    """Raise Float8Unavailable (one line: the key, the reason, the fix) unless it can run."""
    reason = unavailable_reason(device)
    if reason is not None:
        raise Float8Unavailable(
            f"{_KEY}: FP8 with model.linear = 'torch' uses torchao, which {reason}; "
            "set parallel.fp8 = false, or model.linear = 'te' for TransformerEngine's FP8"
        )


def fp8_compatible(linear: nn.Linear) -> bool:
    """torch._scaled_mm needs both matrix dimensions to be multiples of 16."""
    return linear.in_features % 16 == 0 and linear.out_features % 16 == 0


def fp8_candidates(blocks: nn.Module) -> tuple[list[nn.Linear], list[nn.Linear]]:
    """(to convert, to keep): the nn.Linear layers of `blocks`, those inside geometric
    attention or with a dimension not a multiple of 16 kept."""
    geometric = {id(m) for g in blocks.modules() if isinstance(g, GeometricAttention)
                 for m in g.modules()}  # fmt: skip
    linears = [m for m in blocks.modules() if type(m) is nn.Linear]
    convert = [m for m in linears if id(m) not in geometric and fp8_compatible(m)]
    chosen = {id(m) for m in convert}
    return convert, [m for m in linears if id(m) not in chosen]


def convert_blocks(model: nn.Module) -> tuple[int, int]:
    """Swap the blocks' chosen nn.Linear layers (`fp8_candidates`) for torchao's
    Float8Linear, in place; returns (converted, kept). Call before activation checkpointing
    and fully_shard; it does not check the device (`require` does)."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    convert, keep = fp8_candidates(model.layers)  # type: ignore[attr-defined]
    chosen = {id(m) for m in convert}
    convert_to_float8_training(
        model.layers,  # type: ignore[attr-defined]
        module_filter_fn=lambda mod, _fqn: id(mod) in chosen,
        config=Float8LinearConfig(),
    )
    return len(convert), len(keep)


def apply(model: nn.Module, device: torch.device) -> tuple[int, int]:
    """`parallel.fp8` for the model: torchao's conversion when its configured linear
    backend is torch (returns converted, skipped); nothing for TransformerEngine, whose
    FP8 runs under its own autocast in the model's forward (returns 0, 0)."""
    backend = getattr(getattr(model, "cfg", None), "backend", None)
    if backend is not None and backend.linear == "te":
        return 0, 0
    if not isinstance(getattr(model, "layers", None), nn.ModuleList):
        raise Float8Unavailable(f"{_KEY}: FP8 is for the ESM3 transformer's blocks only")
    require(device)
    return convert_blocks(model)
