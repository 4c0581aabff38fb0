"""The checks, one function per row. Each returns its result (text; the throughput row also
its numbers) or raises: Unavailable (the backend is not here: a row "unavailable:
<reason>"), Mismatch (outside tolerance: "FAIL: ...") or anything else ("FAIL: <error>")."""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from esm3.model.config import BackendConfig, ModelConfig, flops_per_token, preset
from esm3.model.esm3 import ESM3
from esm3.train import float8
from esm3.train.config import ParallelConfig
from esm3.train.flops import mfu, peak_flops
from esm3.train.parallel import parallelize

# Relative L2 error of the trunk's output (embeddings after the final norm) against the
# reference: BF16 kernels differ in summation order only; FP8 (E4M3, 3 mantissa bits,
# tensorwise scales) is expected to land within ~10% on a random model.
BF16_TOL = 2e-2
FP8_TOL = 1.5e-1


class Unavailable(Exception):
    """The backend or kernel is not available here; the message is the reason."""


class Mismatch(Exception):
    """Outputs outside tolerance; the message gives the measured error."""


@dataclass(frozen=True)
class Setup:
    """Sizes of one run: the small model of the parity and FSDP rows, the benchmark model."""

    device: torch.device
    small: ModelConfig
    small_batch: tuple[int, int]  # (rows, positions)
    big: ModelConfig
    big_batch: tuple[int, int]
    warmup: int
    steps: int

    @classmethod
    def for_device(cls, device: torch.device, *, tiny: bool, batch: int, steps: int) -> Setup:
        small = preset("tiny", d_model=256, d_head=64)
        if tiny:  # seconds on a CPU: the code paths, not the numbers
            tiny_cfg = preset("tiny", context_length=64)
            return cls(device, tiny_cfg, (2, 32), tiny_cfg, (2, 64), 1, 2)
        big = preset("esm3_1.4b")
        batch = batch if batch > 0 else auto_batch(device)
        return cls(device, small, (2, 256), big, (batch, big.context_length), 3, steps)


def auto_batch(device: torch.device) -> int:
    """Rows of 2048 per 1.4B step: the first block's geometric attention keeps about 18 GB
    per row for backward (256 heads x 2048^2 float32 scores, ~4 tensors), the model's
    states ~22 GB and the other blocks' activations ~8 GB per row: 2 rows fit 141 GB (H200),
    1 row 80 GB (H100)."""
    total = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else 0
    return 2 if total >= 120 * 2**30 else 1


# --- inputs, models, comparisons --------------------------------------------------------


def inputs(B: int, T: int, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tokens and backbone coordinates; two packed sequences per row."""
    g = torch.Generator().manual_seed(seed)
    sid = torch.zeros(B, T, dtype=torch.long)
    sid[:, T // 2 :] = 1
    batch = {
        "sequence": torch.randint(5, 25, (B, T), generator=g),
        "coords": torch.randn(B, T, 3, 3, generator=g) * 10,
        "sequence_id": sid,
    }
    return {k: v.to(device) for k, v in batch.items()}


def small_model(setup: Setup, backend: BackendConfig | None = None) -> ESM3:
    """The small model (same weights for every call), built on the device, in eval mode."""
    cfg = replace(setup.small, backend=backend or BackendConfig())
    torch.manual_seed(0)
    with torch.device(setup.device):
        return ESM3(cfg, device=setup.device).eval()


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """BF16 autocast on CUDA (as training runs); FP32 elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def trunk_output(model: ESM3, batch: dict[str, torch.Tensor], **over) -> torch.Tensor:
    """The embeddings after the final norm, float32: what every backend must agree on."""
    with autocast(next(model.parameters()).device):
        return model(**{**batch, **over}).embeddings.float()


def agreement(ref: torch.Tensor, out: torch.Tensor, tol: float) -> str:
    """ "ok max|diff|=... rel=..." when ||out - ref|| / ||ref|| <= tol; raises Mismatch."""
    if not torch.isfinite(out).all():
        raise Mismatch("non-finite outputs")
    diff = (out - ref).abs().max().item()
    rel = ((out - ref).norm() / ref.norm().clamp_min(1e-12)).item()
    text = f"max|diff|={diff:.2e} rel={rel:.2e} (tol rel {tol:g})"
    if rel > tol:
        raise Mismatch(text)
    return f"ok {text}"


def need_cuda(setup: Setup, what: str) -> None:
    if setup.device.type != "cuda":
        raise Unavailable(f"{what} runs on CUDA only")


def need_module(name: str, what: str) -> None:
    if importlib.util.find_spec(name) is None:
        raise Unavailable(f"{what} is not installed (no module {name!r})")


# --- parity rows ------------------------------------------------------------------------


def reference(setup: Setup) -> str:
    model = small_model(setup)
    out = trunk_output(model, inputs(*setup.small_batch, setup.device))
    if not torch.isfinite(out).all():
        raise Mismatch("non-finite outputs")
    dtype = "bf16 autocast" if setup.device.type == "cuda" else "fp32"
    return f"ok reference for the rows below ({dtype}, packed rows, finite)"


def sdpa_kernel_row(kernel: str, packed: bool) -> Callable[[Setup], str]:
    """One of torch's SDPA kernels against its math kernel (flash takes no mask: unpacked)."""

    def check(setup: Setup) -> str:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        model = small_model(setup)
        batch = inputs(*setup.small_batch, setup.device)
        over = {} if packed else {"sequence_id": None}
        with sdpa_kernel([SDPBackend.MATH]):
            ref = trunk_output(model, batch, **over)
        try:
            with sdpa_kernel([getattr(SDPBackend, kernel)]):
                out = trunk_output(model, batch, **over)
        except RuntimeError as e:
            if "No available kernel" in str(e) or "No viable backend" in str(e):
                raise Unavailable(f"torch has no {kernel} kernel for these inputs") from e
            raise
        return agreement(ref, out, BF16_TOL)

    return check


def xformers_row(setup: Setup) -> str:
    need_cuda(setup, "xformers")
    need_module("xformers", "xformers")
    batch = inputs(*setup.small_batch, setup.device)
    ref = small_model(setup)
    alt = small_model(setup, BackendConfig(attention="xformers"))
    if alt.backends.attention != "xformers":
        raise Unavailable("xformers.ops does not import (see the log line above)")
    alt.load_state_dict(ref.state_dict())
    return agreement(trunk_output(ref, batch), trunk_output(alt, batch), BF16_TOL)


def te_state_dict(torch_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The torch model's weights under TransformerEngine's names: the block's SwiGLU
    (norm, w12, w3) is one te.LayerNormMLP (layer_norm_*, fc1_weight, fc2_weight)."""
    names = {".ffn.norm.weight": ".ffn.layer_norm_weight", ".ffn.norm.bias": ".ffn.layer_norm_bias",
             ".ffn.w12.weight": ".ffn.fc1_weight", ".ffn.w3.weight": ".ffn.fc2_weight"}  # fmt: skip
    out = {}
    for key, value in torch_state.items():
        for old, new in names.items():
            if key.endswith(old):
                key = key[: -len(old)] + new
        out[key] = value
    return out


def te_row(fp8: bool) -> Callable[[Setup], str]:
    def check(setup: Setup) -> str:
        need_cuda(setup, "TransformerEngine")
        need_module("transformer_engine", "TransformerEngine")
        batch = inputs(*setup.small_batch, setup.device)
        ref = small_model(setup)
        alt = small_model(setup, BackendConfig(linear="te", fp8=fp8))
        if alt.backends.linear != "te" or alt.backends.fp8 != fp8:
            raise Unavailable(f"resolved to {alt.backends.describe()} (see the log line above)")
        result = alt.load_state_dict(te_state_dict(ref.state_dict()), strict=False)
        missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
        if missing or result.unexpected_keys:
            raise Mismatch(f"weights do not map: missing {missing[:3]}, "
                           f"unexpected {result.unexpected_keys[:3]}")  # fmt: skip
        tol = FP8_TOL if fp8 else BF16_TOL
        return agreement(trunk_output(ref, batch), trunk_output(alt, batch), tol)

    return check


def torchao_row(setup: Setup) -> str:
    reason = float8.unavailable_reason(setup.device)
    if reason is not None:
        raise Unavailable(reason)
    batch = inputs(*setup.small_batch, setup.device)
    ref = small_model(setup)
    alt = copy.deepcopy(ref)
    converted, kept = float8.convert_blocks(alt)
    result = agreement(trunk_output(ref, batch), trunk_output(alt, batch), FP8_TOL)
    return f"{result}; {converted} linears converted, {kept} kept"


# --- training rows ----------------------------------------------------------------------


def training_loss(out, targets: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy of every head against fixed random targets (every head gets a gradient,
    as in training)."""
    return sum(
        F.cross_entropy(out.logits[t].float().flatten(0, -2), targets[t].flatten()) for t in targets
    )  # type: ignore[return-value]


def random_targets(out, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        t: torch.randint(0, x.shape[-1], x.shape[:-1], generator=g).to(x.device)
        for t, x in out.logits.items()
    }


def local_copy(p: torch.Tensor) -> torch.Tensor:
    """A parameter's local shard (DTensor) or the tensor, detached and copied."""
    return (p.to_local() if hasattr(p, "to_local") else p).detach().clone()


def fsdp_bf16_step(setup: Setup) -> str:
    """One FSDP2 step through `parallelize` with BF16 parameters and FP32 gradient reduction."""
    model = small_model(setup).train()
    model, precision = parallelize(model, ParallelConfig(precision="bf16"), setup.device)
    if setup.device.type == "cuda" and precision != "bf16":
        raise Mismatch(f"parallelize chose {precision} on CUDA, expected bf16")
    params = [p for p in model.parameters() if p.requires_grad]
    before = [local_copy(p) for p in params]
    opt = torch.optim.AdamW(params, lr=1e-3)
    out = model(**inputs(*setup.small_batch, setup.device))
    loss = training_loss(out, random_targets(out))
    loss.backward()
    grad_dtypes = {local_copy(p.grad).dtype for p in params if p.grad is not None}
    opt.step()
    changed = sum(not torch.equal(b, local_copy(p)) for b, p in zip(before, params, strict=True))
    compute = out.embeddings.dtype
    if not torch.isfinite(loss):
        raise Mismatch(f"loss {loss.item()}")
    if precision == "bf16" and compute != torch.bfloat16:
        raise Mismatch(f"forward computed in {compute}, expected bfloat16")
    if grad_dtypes != {torch.float32}:
        raise Mismatch(f"sharded gradients in {sorted(map(str, grad_dtypes))}, expected float32")
    if changed < len(params) // 2:
        raise Mismatch(f"only {changed} of {len(params)} parameters changed")
    return (f"ok loss={loss.item():.3f} {precision} (forward {str(compute)[6:]}, gradients "
            f"float32), {changed}/{len(params)} parameters updated")  # fmt: skip


@dataclass
class Throughput:
    result: str
    tokens_per_s: float
    mfu: float | None
    peak_gib: float | None


def throughput(setup: Setup, *, fp8: bool, ac: bool, soft_deadline: float) -> Throughput:
    """Warm-up then `setup.steps` timed training steps of the big model (FSDP2, BF16, FP8 via
    torchao when asked); stops early at `soft_deadline` (time.monotonic)."""
    dev = setup.device
    if fp8 and (reason := float8.unavailable_reason(dev)) is not None:
        raise Unavailable(reason)
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    cfg = setup.big
    torch.manual_seed(0)
    with torch.device(dev):  # built and initialised on the device
        model = ESM3(cfg, device=dev)
    pcfg = ParallelConfig(precision="bf16", fp8=fp8, activation_checkpointing=ac)
    model, _ = parallelize(model, pcfg, dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    B, T = setup.big_batch
    batch = inputs(B, T, dev, seed=2)
    targets: dict[str, torch.Tensor] = {}

    def step() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        out = model(**batch)
        targets.update(targets or random_targets(out))
        loss = training_loss(out, targets)
        loss.backward()
        opt.step()
        return loss.detach()

    for _ in range(setup.warmup):
        step()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    t0, done = time.perf_counter(), 0
    while done < setup.steps and time.monotonic() < soft_deadline:
        loss = step()
        done += 1
    sync()
    seconds = time.perf_counter() - t0
    if done == 0 or not torch.isfinite(loss):
        raise Mismatch("no timed step finished" if done == 0 else f"loss {loss.item()}")
    tokens = done * B * T
    peak = peak_flops(dev)
    util = mfu(flops_per_token(cfg, T), tokens, seconds, peak, 1) if peak else None
    mem = torch.cuda.max_memory_allocated(dev) / 2**30 if cuda else None
    note = "" if done == setup.steps else f", stopped by the time guard after {done}"
    return Throughput(f"ok {done} steps of {B}x{T} tokens, loss {loss.item():.2f}{note}",
                      tokens / seconds, util, mem)  # fmt: skip
