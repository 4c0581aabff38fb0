"""Functions the platform tests run as real jobs (importable by the job processes)."""

from __future__ import annotations

import os
import socket

from tests.waiting import pause


def square(x: int) -> dict[str, object]:
    return {"x": x, "y": x * x, "node": os.environ.get("SLURMD_NODENAME") or socket.gethostname()}


def boom(message: str) -> None:
    raise ValueError(message)


def sleep(seconds: float) -> str:
    """A job that is busy for `seconds` (something to cancel or kill while it runs)."""
    pause(seconds)
    return "slept"


def allreduce() -> dict[str, object]:
    """Every rank contributes rank+1; the all-reduced sum is world*(world+1)/2."""
    import torch
    import torch.distributed as dist

    from jobs.distributed import init_from_submitit

    info = init_from_submitit()
    t = torch.tensor([float(info.rank + 1)])
    dist.all_reduce(t)
    dist.barrier()
    dist.destroy_process_group()
    return {
        "rank": info.rank,
        "world": info.world_size,
        "sum": t.item(),
        "backend": info.backend,
        "node": os.environ.get("SLURMD_NODENAME"),
    }


def busy_with_progress(seconds: float) -> str:
    """Like an mmseqs task: a child process does the work while progress bars go to
    stderr, so a cancelled task's last stderr lines are progress, not its error."""
    import subprocess
    import sys

    for pct in (10, 20, 30):
        print(f"[{'=' * pct}>{' ' * (30 - pct)}] {pct}.00% 12 0s 4ms", file=sys.stderr, flush=True)
    subprocess.run(["sleep", str(seconds)], check=True)
    return "done"


def stage_square(ws: str, run_id: str, x: int) -> dict[str, object]:
    """`square` as a preprocessing stage task: (workspace, run id, *args)."""
    return square(x)


def stage_boom(ws: str, run_id: str, message: str) -> None:
    boom(message)
