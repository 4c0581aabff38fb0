"""Sharded checkpoints with torch.distributed.checkpoint (DCP).

Layout: `<root>/step_<08d>/` holds DCP's files (one per rank, plus `.metadata`) and
`train_state.json`, written by rank 0 last, after every rank's shard is on disk. A folder
without `train_state.json` is incomplete (a save cut short) and is never loaded. Loading
tries the newest complete checkpoint first and falls back to older ones when it is
unreadable (truncated or corrupt files), reporting each failure.

The state is FQN-keyed (`get_state_dict`), so a checkpoint loads on any world size and
with or without activation checkpointing; `train_state.json` carries the model's
fingerprint, and a checkpoint of another model is refused with the differing fields.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

log = logging.getLogger(__name__)

STATE_FILE = "train_state.json"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


class CheckpointMismatch(ValueError):
    """The checkpoint was written by a different model."""


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def list_checkpoints(root: str | Path, *, complete_only: bool = True) -> list[tuple[int, Path]]:
    """(step, folder) of the checkpoints under root, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir() and (not complete_only or (p / STATE_FILE).exists()):
            out.append((int(m.group(1)), p))
    return sorted(out)


def read_state(path: str | Path) -> dict[str, Any]:
    """The train state of a checkpoint folder; ValueError naming the file if unreadable."""
    f = Path(path) / STATE_FILE
    try:
        return json.loads(f.read_text())
    except FileNotFoundError as e:
        raise ValueError(f"{f}: missing (the checkpoint is incomplete)") from e
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{f}: unreadable ({e})") from e


def fingerprint(model_cfg: Any) -> dict[str, Any]:
    """The fields that must match for weights to load: sizes, layer kinds, vocabularies."""
    d = asdict(model_cfg) if is_dataclass(model_cfg) else dict(model_cfg)
    keep = ("d_model", "n_layers", "d_head", "ffn_hidden", "layer_pattern", "heads", "tracks")
    out = {k: d[k] for k in keep if k in d}
    if hasattr(model_cfg, "ffn_hidden"):
        out["ffn_hidden"] = model_cfg.ffn_hidden
    return json.loads(json.dumps(out, default=list))


def check_compatible(state: dict[str, Any], expected: dict[str, Any], where: str) -> None:
    """Raise CheckpointMismatch naming the differing fields."""
    got = state.get("model")
    if got is None:
        raise CheckpointMismatch(f"checkpoint {where}: no model fingerprint in {STATE_FILE}")
    diff = [k for k in sorted(set(got) | set(expected)) if got.get(k) != expected.get(k)]
    if diff:
        shown = "; ".join(
            f"{k}: checkpoint {got.get(k)!r} vs config {expected.get(k)!r}" for k in diff
        )
        raise CheckpointMismatch(f"checkpoint {where} is from another model ({shown})")


def _state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if optimizer is None:
        return {"model": get_model_state_dict(model)}
    msd, osd = get_state_dict(model, optimizer)
    return {"model": msd, "optim": osd}


def _atomic_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, sort_keys=True, default=str))
    os.replace(tmp, path)


@dataclass
class PendingSave:
    """A checkpoint being written (asynchronously, or already done)."""

    path: Path
    step: int
    train_state: dict[str, Any]
    rank: int
    keep: int
    future: Any = None
    finished: bool = False

    def done(self) -> bool:
        return self.future is None or self.future.done()

    def finish(self) -> Path:
        """Wait for the write, then (rank 0) mark it complete and prune old checkpoints."""
        if self.finished:
            return self.path
        if self.future is not None:
            self.future.result()
        if self.rank == 0:
            _atomic_json(self.path / STATE_FILE, self.train_state)
            prune(self.path.parent, self.keep)
        self.finished = True
        return self.path


def save(
    root: str | Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    train_state: dict[str, Any],
    *,
    rank: int = 0,
    keep: int = 3,
    async_save: bool = False,
    process_group: Any = None,
) -> PendingSave:
    """Save model and optimizer (sharded, every rank) and the train state (rank 0).

    Synchronous by default: returns a finished PendingSave. With `async_save`, returns at
    once after staging; call `finish()` before the next save (and before exiting).
    A process group of its own (gloo) keeps the background collectives apart from training's.
    """
    import torch.distributed.checkpoint as dcp

    path = step_dir(root, step)
    if rank == 0 and path.exists():  # a leftover of a save cut short, or a rollback
        shutil.rmtree(path)
    _barrier(process_group)
    path.mkdir(parents=True, exist_ok=True)
    sd = _state_dicts(model, optimizer)
    pending = PendingSave(path, step, {**train_state, "step": step}, rank, keep)
    if async_save:
        pending.future = dcp.async_save(sd, checkpoint_id=str(path), process_group=process_group)
        return pending
    dcp.save(sd, checkpoint_id=str(path), process_group=process_group)
    pending.finish()
    _barrier(process_group)
    return pending


def load(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    process_group: Any = None,
) -> dict[str, Any]:
    """Load a complete checkpoint into model (and optimizer) in place; returns its train state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    path = Path(path)
    state = read_state(path)
    sd = _state_dicts(model, optimizer)
    dcp.load(sd, checkpoint_id=str(path), process_group=process_group)
    set_state_dict(
        model,
        optimizer if optimizer is not None else [],
        model_state_dict=sd["model"],
        optim_state_dict=sd.get("optim", {}),
        options=StateDictOptions(strict=True),
    )
    return state


def load_latest(
    root: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    expected_model: dict[str, Any] | None = None,
    on_failure: Callable[[Path, str], None] | None = None,
    process_group: Any = None,
    max_step: int | None = None,
) -> tuple[Path, dict[str, Any]] | None:
    """Load the newest loadable complete checkpoint (at most `max_step`); None if there is none.

    An unreadable checkpoint is reported through `on_failure(path, reason)` and the next
    older one is tried. A checkpoint of another model raises CheckpointMismatch at once.
    """
    for step, path in reversed(list_checkpoints(root)):
        if max_step is not None and step > max_step:
            continue
        try:
            state = read_state(path)
            if expected_model is not None:
                check_compatible(state, expected_model, str(path))
            return path, load(path, model, optimizer, process_group=process_group)
        except CheckpointMismatch:
            raise
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - any read error: older one
            reason = (
                f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
            )
            log.warning("checkpoint %s unreadable (%s); trying an older one", path, reason)
            if on_failure is not None:
                on_failure(path, reason)
    return None


def prune(root: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` complete checkpoints (and incomplete older ones)."""
    done = list_checkpoints(root)
    removed = []
    if len(done) > keep:
        for _, p in done[:-keep]:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    newest_kept = done[-keep][0] if len(done) >= keep else (done[0][0] if done else None)
    if newest_kept is not None:
        for step, p in list_checkpoints(root, complete_only=False):
            if step < newest_kept and not (p / STATE_FILE).exists():
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def _barrier(group: Any) -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier(group=group)
