"""The one way preprocessing opens DuckDB: every connection gets the task's memory limit,
thread count and temporary directory (DESIGN.md, "Data at scale"), so a join or sort larger
than the limit spills to disk instead of growing the process.

A job sets the limits once per task from its allocation (`configure`, called by the task
wrappers in `jobs/stages`); library functions call `connect()` without knowing them.
Explicit arguments win over the configured ones. `esm3.metrics` keeps its own catalog
connections (not preprocessing).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import duckdb


@dataclass(frozen=True)
class Limits:
    memory_limit: str | None = None  # a DuckDB size, e.g. "4000M"
    threads: int | None = None
    temp_dir: str | None = None


_configured = Limits()


def configure(
    memory_limit: str | None = None,
    threads: int | None = None,
    temp_dir: str | Path | None = None,
) -> Limits:
    """Set the limits of every later `connect()` in this process; returns the previous ones."""
    global _configured
    previous = _configured
    _configured = Limits(memory_limit, threads, str(temp_dir) if temp_dir else None)
    return previous


def configured() -> Limits:
    return _configured


@contextmanager
def limits(
    memory_limit: str | None = None,
    threads: int | None = None,
    temp_dir: str | Path | None = None,
) -> Iterator[Limits]:
    """`configure` for the duration of a block."""
    previous = configure(memory_limit, threads, temp_dir)
    try:
        yield _configured
    finally:
        configure(previous.memory_limit, previous.threads, previous.temp_dir)


def connect(
    memory_limit: str | None = None,
    threads: int | None = None,
    temp_dir: str | Path | None = None,
) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection under the given, else the configured, limits.

    Settings go in through the config, never SQL text: a path or size is never pasted
    into a statement.
    """
    lim = replace(
        _configured,
        **{
            k: v
            for k, v in (("memory_limit", memory_limit), ("threads", threads),
                         ("temp_dir", str(temp_dir) if temp_dir else None))
            if v
        },
    )  # fmt: skip
    config: dict[str, object] = {}
    if lim.memory_limit:
        config["memory_limit"] = str(lim.memory_limit)
    if lim.threads:
        config["threads"] = int(lim.threads)
    if lim.temp_dir:
        Path(lim.temp_dir).mkdir(parents=True, exist_ok=True)
        config["temp_directory"] = lim.temp_dir
    con = duckdb.connect(config=config)
    con.sql("SET enable_progress_bar = false")
    return con
