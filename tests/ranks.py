"""Ending a rank spawned by a multi-rank test (torch.multiprocessing, gloo)."""

from __future__ import annotations

import os
import sys
from typing import NoReturn


def exit_rank() -> NoReturn:
    """Leave a spawned rank at once, after its results are on disk and its process group is
    destroyed.

    FSDP2 keeps its process group alive through references Python's collector cannot reach,
    so gloo's worker threads outlive `destroy_process_group`. A worker still releasing the
    last collective's tensors needs the GIL; if the interpreter is finalising by then, the
    thread is torn down inside a destructor and the rank aborts ("terminate called without
    an active exception", SIGABRT) although its work is done. Exiting without finalisation
    has nothing left to lose and no such race."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
