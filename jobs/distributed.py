"""torch.distributed set-up from submitit's environment (NCCL on GPUs, gloo on CPU)."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    backend: str
    master: str


def init_from_submitit(backend: str | None = None, timeout_s: float = 300) -> DistInfo:
    """Initialise the default process group from the job's environment; returns who we are."""
    import datetime

    import submitit
    import torch
    import torch.distributed as dist

    env = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(env.local_rank % max(torch.cuda.device_count(), 1))
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            rank=env.rank,
            world_size=env.world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    master = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    return DistInfo(env.rank, env.world_size, env.local_rank, backend, master)
