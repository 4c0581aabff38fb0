"""The workspace: one root for data, runs, logs and the metrics lake (shared FS on clusters).

Resolved from `--workspace`, else env ESM3_WORKSPACE, else ./workspace.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import duckdb

from esm3.metrics.catalog import refresh_catalog_file
from esm3.metrics.lake import ensure_lake


class WorkspaceError(RuntimeError):
    """The workspace cannot be used; the message says which folder and why."""


def resolve(path: str | Path | None = None) -> Path:
    return Path(path or os.environ.get("ESM3_WORKSPACE") or "workspace").expanduser().resolve()


def prepare(path: str | Path | None = None) -> Path:
    """Create the workspace layout and check it is writable; returns its absolute path."""
    ws = resolve(path)
    try:
        for sub in ("lake", "runs", "data", "logs/submitit"):
            (ws / sub).mkdir(parents=True, exist_ok=True)
        probe = ws / f".write-test-{uuid.uuid4().hex[:8]}"
        try:
            probe.write_text("ok")
        finally:  # a full disk creates the file, then fails to write it
            probe.unlink(missing_ok=True)
    except OSError as e:
        reason = e.strerror or str(e)
        raise WorkspaceError(f"workspace {ws} is not writable: {reason}") from e
    ensure_lake(ws)
    if not (ws / "esm3.duckdb").exists():
        refresh_catalog_file(ws)
    return ws


def for_reading(path: str | Path | None = None) -> Path:
    """A workspace for commands that only read (`esm3 sql`, `esm3 status`): prepared when
    it is writable, else (a full disk, a read-only mount) used as it is if it has a lake."""
    try:
        return prepare(path)
    except (WorkspaceError, OSError, duckdb.Error):
        ws = resolve(path)
        if (ws / "lake").is_dir():
            return ws
        raise


def submitit_folder(ws: Path, run_id: str) -> Path:
    return ws / "logs" / "submitit" / run_id


def run_dir(ws: Path, run_id: str) -> Path:
    return ws / "runs" / run_id
