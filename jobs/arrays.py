"""Arrays that fit a real scheduler: a stage's items grouped into tasks, the tasks into
arrays of at most `MaxArraySize - 1` tasks each.

SLURM refuses an array with an index >= MaxArraySize (default 1001; sites set their own)
and every task costs the scheduler a job record, so a stage of hundreds of thousands of
items runs as a bounded number of tasks, each working through a contiguous chunk of the
items with a process pool of the task's CPUs. A task receives its chunk (the items of a
list, or a range of an `ItemSource` it reads inside the job), never one pickle per item.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import re
import subprocess
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

SLURM_DEFAULT_MAX_ARRAY_SIZE = 1001  # SLURM's own default for MaxArraySize
DEFAULT_MAX_TASKS_PER_STAGE = 10_000  # SLURM's default MaxJobCount: past it, chunk harder


@runtime_checkable
class ItemSource(Protocol):
    """Items described rather than listed (an inventory file and its row ranges): the
    submitting process only needs the count; a task reads its own range in the job."""

    def __len__(self) -> int: ...

    def rows(self, start: int, stop: int) -> list[tuple]:
        """The argument tuples of items [start, stop)."""
        ...


Items = Sequence[tuple] | ItemSource


@dataclass(frozen=True)
class IndexedItems:
    """`n` items made from their index by `make(i)` (a picklable callable): the submitting
    process never lists them, each task makes its own range."""

    n: int
    make: Callable[[int], tuple]

    def __len__(self) -> int:
        return self.n

    def rows(self, start: int, stop: int) -> list[tuple]:
        return [self.make(i) for i in range(start, min(stop, self.n))]


@dataclass(frozen=True)
class JoinedItems:
    """Several item lists or sources one after the other, as one stage's items."""

    parts: tuple[Sequence[tuple] | ItemSource, ...]

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts)

    def rows(self, start: int, stop: int) -> list[tuple]:
        out: list[tuple] = []
        first = 0
        for p in self.parts:
            lo, hi = max(start, first), min(stop, first + len(p))
            if lo < hi:
                got = (
                    p.rows(lo - first, hi - first)
                    if isinstance(p, ItemSource)
                    else p[lo - first : hi - first]
                )
                out += [tuple(r) for r in got]
            first += len(p)
        return out


@dataclass(frozen=True)
class ArrayPlan:
    """How `n_items` items become tasks (`items_per_task` each, the last one shorter) and
    the tasks become arrays (`tasks_per_array` each, the last one shorter)."""

    n_items: int
    items_per_task: int
    tasks_per_array: int

    @property
    def n_tasks(self) -> int:
        return math.ceil(self.n_items / self.items_per_task)

    @property
    def arrays(self) -> list[range]:
        """Task indices of each array, in order."""
        step = self.tasks_per_array
        return [range(a, min(a + step, self.n_tasks)) for a in range(0, self.n_tasks, step)]

    def items_of(self, task: int) -> range:
        start = task * self.items_per_task
        return range(start, min(start + self.items_per_task, self.n_items))

    def describe(self) -> str:
        sizes = [len(a) for a in self.arrays]
        shape = f"{len(sizes)} array(s) of {sizes[0]}" if sizes else "no array"
        if len(set(sizes)) > 1:
            shape += f" (last {sizes[-1]})"
        return (f"{self.n_items} item(s) in {self.n_tasks} task(s) of <= {self.items_per_task}, "
                f"{shape}")  # fmt: skip


def plan_arrays(
    n_items: int,
    *,
    max_array_size: int,
    items_per_task: int = 1,
    max_tasks: int = DEFAULT_MAX_TASKS_PER_STAGE,
) -> ArrayPlan:
    """The plan for a stage: `items_per_task` items per task, raised so the stage has at
    most `max_tasks` tasks; arrays of at most `max_array_size - 1` tasks (SLURM's array
    indices run 0 .. MaxArraySize - 1)."""
    if n_items < 1:
        raise ValueError("a stage needs at least one item")
    if max_array_size < 2:
        raise ValueError(f"max_array_size {max_array_size} allows no array task (needs >= 2)")
    per_task = max(1, items_per_task, math.ceil(n_items / max(1, max_tasks)))
    return ArrayPlan(n_items, per_task, max_array_size - 1)


# --- the scheduler's limit ---------------------------------------------------------------

_MAX_ARRAY = re.compile(r"^MaxArraySize\s*=\s*(\d+)", re.MULTILINE)


def parse_max_array_size(config_text: str) -> int | None:
    """MaxArraySize from the output of `scontrol show config` (None if absent)."""
    m = _MAX_ARRAY.search(config_text)
    return int(m.group(1)) if m else None


def scheduler_max_array_size(env: dict[str, str] | None = None) -> int | None:
    """Ask the scheduler (`scontrol show config`, SLURM_CONF from `env`); None when it
    does not answer."""
    try:
        proc = subprocess.run(
            ["scontrol", "show", "config"], env=env, capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return parse_max_array_size(proc.stdout) if proc.returncode == 0 else None


# --- inside the task ---------------------------------------------------------------------


@dataclass(frozen=True)
class Chunk:
    """What one task receives: the items [first, stop) as a list, or the source to read
    them from inside the job."""

    first: int
    stop: int
    listed: list[tuple] | None = None
    source: ItemSource | None = None

    def load(self) -> list[tuple]:
        if self.listed is not None:
            return self.listed
        assert self.source is not None
        return list(self.source.rows(self.first, self.stop))


def chunk_of(items: Items, span: range) -> Chunk:
    if isinstance(items, ItemSource):
        return Chunk(span.start, span.stop, source=items)
    return Chunk(span.start, span.stop, listed=[tuple(items[i]) for i in span])


class ItemFailed(RuntimeError):
    """An item of a task failed: the message names the stage, the item and its error."""


def job_cpus() -> int:
    """CPUs this job may use: its share on the local executor (or in a task's pool),
    SLURM's allocation, else this process's CPU affinity."""
    for var in ("ESM3_JOB_CPUS", "SLURM_CPUS_PER_TASK", "SLURM_CPUS_ON_NODE"):
        v = os.environ.get(var, "")
        if v.isdigit() and int(v) > 0:
            return int(v)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _short(args: tuple, limit: int = 200) -> str:
    text = repr(args)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def run_item(stage: str, fn: Callable[..., Any], index: int, args: tuple) -> Any:
    from jobs.records import Interrupted

    try:
        return fn(*args)
    except Interrupted:
        raise  # a requeue, not a failure of the item
    except Exception as e:
        raise ItemFailed(f"{stage} item {index} {_short(args)}: {type(e).__name__}: {e}") from e


def _pool_worker_start(cpus: int, workers: int) -> None:
    # the worker's share of the task's CPUs and memory (`runner.job_memory_limit`)
    os.environ["ESM3_JOB_CPUS"] = str(cpus)
    os.environ["ESM3_POOL_WORKERS"] = str(workers)


@dataclass
class RunChunk:
    """A task's work: fn(*item) for each item of its chunk, on a process pool of the
    task's CPUs when there are several; returns the results in item order."""

    stage: str
    fn: Callable[..., Any]

    def __call__(self, chunk: Chunk) -> list[Any]:
        rows = chunk.load()
        cpus = job_cpus()
        workers = min(cpus, len(rows))
        if workers <= 1:
            return [run_item(self.stage, self.fn, chunk.first + k, r) for k, r in enumerate(rows)]
        # forkserver: workers do not inherit the task's threads or its SIGTERM handler
        ctx = multiprocessing.get_context("forkserver")
        share = max(1, cpus // workers)
        with ProcessPoolExecutor(
            workers, mp_context=ctx, initializer=_pool_worker_start, initargs=(share, workers)
        ) as pool:
            futures = [
                pool.submit(run_item, self.stage, self.fn, chunk.first + k, r)
                for k, r in enumerate(rows)
            ]
            try:
                return [f.result() for f in futures]
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
