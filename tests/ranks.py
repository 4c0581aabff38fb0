"""Multi-rank tests: spawning ranks (torch.multiprocessing, gloo) and ending them."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import NoReturn

import torch.multiprocessing as mp

from tests.waiting import wait_for


def spawn_two_ranks(fn: Callable[..., None], args: tuple, timeout_s: float) -> None:
    """Run fn(rank, *args) in two spawned processes until both exit (a rank's exception is
    raised here); past timeout_s they are ended and the wait fails."""
    ctx = mp.start_processes(fn, args=args, nprocs=2, start_method="spawn", join=False)
    try:
        wait_for(lambda: ctx.join(timeout=0), timeout_s, "both ranks to finish")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()


def exit_rank() -> NoReturn:
    """Leave a spawned rank at once, after its results are on disk and its process group is
    destroyed (call it after the `try/finally` that destroys it, so a failure still
    propagates).

    FSDP2 keeps its process group alive through references Python's collector cannot reach
    (a DeviceMesh held by DTensor specs), so gloo's worker threads outlive
    `destroy_process_group`. A worker still releasing the last collective's tensors needs
    the GIL; if the interpreter is finalising by then, the thread is torn down inside a
    destructor and the rank aborts ("terminate called without an active exception",
    SIGABRT) although its work is done. Exiting without finalisation avoids that race."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
