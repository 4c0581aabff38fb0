"""python3 -m jobs.gpucheck [--out FILE] [--wheels DIR] [--budget S] [--device cpu --tiny]

Prints one table (see README, "On a GPU"); exits 1 when a row failed, 0 otherwise, and 0
with one line where there is no CUDA device.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from jobs.gpucheck.table import FAIL, SKIPPED, UNAVAILABLE, Row, header, text_row, write
from jobs.gpucheck.wheels import add_wheels

MIN_ROW_S = 10.0  # a row is not started with less time left than this


class RowTimeout(Exception):
    pass


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python3 -m jobs.gpucheck", description=__doc__)
    p.add_argument("--out", type=Path, help="also write the table here (.json or Markdown)")
    p.add_argument("--wheels", type=Path, default=Path("gpu-wheels"),
                   help="folder of wheels to put on sys.path first (make gpu-wheels)")  # fmt: skip
    p.add_argument("--budget", type=float, default=300.0,
                   help="seconds for all rows; rows that would start later are skipped")  # fmt: skip
    p.add_argument("--batch", type=int, default=0,
                   help="rows of 2048 tokens per 1.4B step (0: 2 on >= 120 GiB GPUs, else 1)")  # fmt: skip
    p.add_argument("--steps", type=int, default=20, help="timed steps per throughput row")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --tiny)")
    p.add_argument("--tiny", action="store_true", help="tiny models: the code paths on a CPU")
    return p.parse_args(argv)


@contextlib.contextmanager
def alarm(seconds: float) -> Iterator[None]:
    """Raise RowTimeout in this (main) thread after `seconds`, between Python operations."""

    def fire(signum, frame):
        raise RowTimeout(f"timed out after {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def free_memory(device: torch.device) -> None:
    """Release what the last row held; a CUDA error here is the row's, already reported."""
    gc.collect()
    if device.type == "cuda":
        with contextlib.suppress(RuntimeError):
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()


def run_row(name: str, fn: Callable[[float], Row], deadline: float, cap: float,
            device: torch.device) -> Row:  # fmt: skip
    """`fn(soft_deadline)` under a time limit of min(cap, time left); never raises."""
    from jobs.gpucheck.rows import Mismatch, Unavailable

    left = deadline - time.monotonic()
    if left < MIN_ROW_S:
        return Row(name, f"{SKIPPED}: time budget")
    limit = min(cap, left)
    try:
        with alarm(limit):
            return fn(time.monotonic() + 0.8 * limit)
    except Unavailable as e:
        return Row(name, f"{UNAVAILABLE}: {e}")
    except Mismatch as e:
        return Row(name, f"{FAIL}: {e}")
    except Exception as e:  # one failing row must not stop the others
        return Row(name, f"{FAIL}: {one_line(e)}")
    finally:
        free_memory(device)


def plan(setup) -> list[tuple[str, float, Callable[[float], Row]]]:
    """(row name, time cap in seconds, fn(soft_deadline) -> Row), in table order."""
    from jobs.gpucheck import rows as r

    def simple(name: str, check: Callable) -> tuple[str, float, Callable[[float], Row]]:
        return name, 45.0, lambda _deadline: Row(name, check(setup))

    def bench(fp8: bool, ac: bool) -> tuple[str, float, Callable[[float], Row]]:
        B, T = setup.big_batch
        name = f"{setup.big.name} {'FP8 torchao' if fp8 else 'BF16'}{' +AC' if ac else ''}"

        def run(soft_deadline: float) -> Row:
            t = r.throughput(setup, fp8=fp8, ac=ac, soft_deadline=soft_deadline)
            return Row(name, t.result, t.tokens_per_s, t.mfu, t.peak_gib)

        return name, 75.0, run

    return [
        simple("reference: sdpa + torch linear", r.reference),
        simple("attention sdpa flash kernel", r.sdpa_kernel_row("FLASH_ATTENTION", False)),
        simple("attention sdpa efficient kernel (packed)",
               r.sdpa_kernel_row("EFFICIENT_ATTENTION", True)),  # fmt: skip
        simple("attention xformers (packed)", r.xformers_row),
        simple("linear TransformerEngine", r.te_row(fp8=False)),
        simple("linear TransformerEngine FP8", r.te_row(fp8=True)),
        simple("linear torchao float8", r.torchao_row),
        ("FSDP2 BF16 training step (1 rank)", 60.0,
         lambda _d: Row("FSDP2 BF16 training step (1 rank)", r.fsdp_bf16_step(setup))),
        bench(False, False),
        bench(False, True),
        bench(True, False),
        bench(True, True),
    ]  # fmt: skip


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[None]:
    """A one-rank process group (NCCL on CUDA, gloo on CPU) for FSDP2; no network needed."""
    import torch.distributed as dist

    if device.type == "cuda":
        torch.cuda.set_device(device)
        # one rank talks to no one: NCCL's bootstrap needs only the loopback interface
        os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def describe(device: torch.device, wheels: list[str]) -> dict[str, str]:
    import importlib.util

    meta = {"torch": torch.__version__, "device": str(device)}
    if device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        meta["device"] = f"{torch.cuda.get_device_name(device)} (sm {cap[0]}.{cap[1]})"
        meta["cuda"] = str(torch.version.cuda)
    meta["wheels"] = ", ".join("-".join(w.split("-")[:2]) for w in wheels) or "none"
    for name in ("torchao", "transformer_engine", "xformers"):
        meta[name] = "installed" if importlib.util.find_spec(name) else "not installed"
    return meta


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"gpu-check skipped: no CUDA device here (torch {torch.__version__})")
        return 0
    if device.type == "cuda" and device.index is None:  # torch.cuda.set_device needs one
        device = torch.device("cuda", torch.cuda.current_device())
    start = time.monotonic()
    # torchao's float8 training needs none of its compiled kernels (built for one CUDA)
    os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
    wheels = add_wheels(args.wheels)
    from jobs.gpucheck.rows import Setup

    setup = Setup.for_device(device, tiny=args.tiny, batch=args.batch, steps=args.steps)
    meta = describe(device, wheels)
    B, T = setup.big_batch
    meta["budget"] = (
        f"{args.budget:.0f} s for the rows; throughput: {setup.big.name}, "
        f"{setup.warmup} warm-up + {setup.steps} timed steps of {B}x{T} tokens"
    )
    print("gpu-check: " + "; ".join(f"{k} {v}" for k, v in meta.items()), flush=True)
    print(header(), flush=True)
    done: list[Row] = []
    deadline = start + args.budget
    with process_group(device):
        for name, cap, fn in plan(setup):
            row = run_row(name, fn, deadline, cap, device)
            done.append(row)
            print(text_row(row), flush=True)
    meta["elapsed"] = f"{time.monotonic() - start:.0f} s"
    print(f"gpu-check finished in {meta['elapsed']}", flush=True)
    if args.out:
        write(args.out, done, meta)
        print(f"table written to {args.out}")
    return 1 if any(r.failed for r in done) else 0


if __name__ == "__main__":
    sys.exit(main())
