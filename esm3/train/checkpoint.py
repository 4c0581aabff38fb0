"""Sharded checkpoints with torch.distributed.checkpoint (DCP).

Layout: `<root>/step_<08d>/` holds DCP's files (one per rank, plus `.metadata`) and
`train_state.json`, written by rank 0 last (temp + rename), after every rank's shard is on
disk. `train_state.json` is the manifest: it records the size and BLAKE2b hash of every
other file, and whether training was clean (no non-finite step) since the previous
checkpoint. A folder without it is incomplete (a save cut short) and is never loaded.

Loading tries the newest complete checkpoint first. Its files are hashed (each rank
hashes its share, the verdict is agreed by all) before DCP reads them, because a shard
overwritten in place keeps its size and DCP would load the garbage without complaint.
A checkpoint that fails (a file missing, resized or changed, or unloadable) is reported
and the next older one is tried; one whose files fail the check is also marked `REFUSED`.

Pruning keeps the newest `keep` checkpoints and, beyond those, the newest clean one, so a
run that saves through a bad stretch always has a good point to return to. Before the
manifest is renamed into place a `before_commit` hook runs: the trainer flushes its
metrics and the "saved" event there, so a declared checkpoint never has lost metrics.

The state is FQN-keyed (`get_state_dict`), so a checkpoint loads on any world size and
with or without activation checkpointing; `train_state.json` carries the model's
fingerprint, and a checkpoint of another model is refused with the differing fields.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, is_dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

log = logging.getLogger(__name__)

STATE_FILE = "train_state.json"
REFUSED_FILE = "REFUSED"  # written into a checkpoint that failed to load: why
HASH = "blake2b"
_CHUNK = 4 << 20  # bytes per read while hashing: memory stays flat for any shard size
_STEP_DIR = re.compile(r"^step_(\d{8})$")


class CheckpointMismatch(ValueError):
    """The checkpoint was written by a different model."""


class CheckpointCorrupt(ValueError):
    """A checkpoint's files do not match its manifest; the message names them."""


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


def resolve(path: str | Path) -> Path:
    """A checkpoint folder, or a folder of them (a run's): its newest complete one.
    Raises FileNotFoundError naming the path when it is neither."""
    path = Path(path)
    if (path / STATE_FILE).exists():
        return path
    found = list_checkpoints(path)
    if not found:
        raise FileNotFoundError(f"{path}: not a checkpoint (no {STATE_FILE}) nor a folder of them")
    return found[-1][1]


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
    """The fields that must match for weights to load: sizes, layer kinds, vocabularies
    (a config with a `fingerprint()` of its own, the VQ-VAE's, says them itself)."""
    if hasattr(model_cfg, "fingerprint"):
        return json.loads(json.dumps(model_cfg.fingerprint(), default=list))
    d = asdict(model_cfg) if is_dataclass(model_cfg) else dict(model_cfg)
    keep = ("d_model", "n_layers", "d_head", "ffn_hidden", "layer_pattern", "heads", "tracks")
    out = {k: d[k] for k in keep if k in d}
    if hasattr(model_cfg, "ffn_hidden"):
        out["ffn_hidden"] = model_cfg.ffn_hidden
    if hasattr(model_cfg, "n_geom_heads"):
        out["geom_heads"] = model_cfg.n_geom_heads
    return json.loads(json.dumps(out, default=list))


def model_config(state: dict[str, Any], name: str = "from-checkpoint") -> Any:
    """The ModelConfig a checkpoint's fingerprint describes: enough to rebuild the module
    its weights load into (checkpoints before geometric heads were recorded: the default)."""
    from esm3.model.config import ModelConfig
    from esm3.tokenize.tracks import TrackSizes

    fp = state.get("model")
    if not isinstance(fp, dict):
        raise CheckpointMismatch(f"no model fingerprint in {STATE_FILE}")
    d, hidden = fp["d_model"], fp["ffn_hidden"]
    cfg = ModelConfig(
        name=name, d_model=d, n_layers=fp["n_layers"], d_head=fp["d_head"],
        layer_pattern=fp["layer_pattern"], heads=tuple(fp["heads"]),
        tracks=TrackSizes(**fp["tracks"]), geom_heads=fp.get("geom_heads", 0),
        ffn_ratio=8 / 3, ffn_multiple=256,
    )  # fmt: skip
    if cfg.ffn_hidden != hidden:  # another rounding: a ratio and multiple that give it exactly
        cfg = replace(cfg, ffn_ratio=hidden / d, ffn_multiple=hidden)
    return cfg


def check_compatible(state: dict[str, Any], expected: dict[str, Any], where: str) -> None:
    """Raise CheckpointMismatch naming the differing fields."""
    got = state.get("model")
    if got is None:
        raise CheckpointMismatch(f"checkpoint {where}: no model fingerprint in {STATE_FILE}")
    diff = [k for k in sorted(set(got) | set(expected)) if got.get(k) != expected.get(k)]
    if diff:
        shown = "; ".join(
            _vocabulary_diff(got["tracks"], expected["tracks"])
            if k == "tracks" and isinstance(got.get(k), dict) and isinstance(expected.get(k), dict)
            else f"{k}: checkpoint {got.get(k)!r} vs config {expected.get(k)!r}"
            for k in diff
        )
        raise CheckpointMismatch(f"checkpoint {where} is from another model ({shown})")


def _vocabulary_diff(got: dict[str, Any], expected: dict[str, Any]) -> str:
    """Track sizes that differ, said as vocabularies (a new vocabulary file changes them)."""
    return "; ".join(
        f"vocabulary of track '{t}': checkpoint {got.get(t)} token ids vs config {expected.get(t)}"
        for t in sorted(set(got) | set(expected))
        if got.get(t) != expected.get(t)
    )


def file_hash(path: str | Path) -> str:
    """BLAKE2b of a file's content, read in chunks."""
    h = hashlib.blake2b()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)  # releases the GIL: files hash in parallel threads
    return h.hexdigest()


def _hash_or_error(path: Path) -> str:
    try:
        return file_hash(path)
    except OSError as e:
        return f"!unreadable ({e.strerror or e})"


def _hash_many(paths: list[Path]) -> list[str]:
    """Hashes of the files ("!reason" for one that cannot be read), in parallel threads."""
    if len(paths) <= 1:
        return [_hash_or_error(p) for p in paths]
    with ThreadPoolExecutor(max_workers=min(4, len(paths))) as pool:
        return list(pool.map(_hash_or_error, paths))


def _is_payload(p: Path) -> bool:
    """A file the manifest covers: everything but the manifest, markers and temp files."""
    return p.is_file() and p.name not in (STATE_FILE, REFUSED_FILE) and not p.name.endswith(".tmp")


def file_manifest(folder: str | Path) -> dict[str, dict[str, Any]]:
    """{file name: {size, blake2b}} for every file DCP wrote into `folder`."""
    files = sorted(p for p in Path(folder).iterdir() if _is_payload(p))
    out = {}
    for p, h in zip(files, _hash_many(files), strict=True):
        if h.startswith("!"):  # a file just written cannot be read back: fail the save
            raise OSError(f"{p}: {h[1:]}")
        out[p.name] = {"size": p.stat().st_size, HASH: h}
    return out


def check_files(
    folder: str | Path, files: dict[str, dict[str, Any]], names: list[str]
) -> list[str]:
    """Problems of the named manifest entries, one line each naming the file (empty: intact)."""
    folder = Path(folder)
    problems, to_hash = [], []
    for name in names:
        p, want = folder / name, files[name]
        try:
            size = p.stat().st_size
        except FileNotFoundError:
            problems.append(f"{name}: missing")
            continue
        except OSError as e:  # reported, not raised: the other ranks wait for our findings
            problems.append(f"{name}: {e.strerror or e}")
            continue
        if size != want["size"]:
            problems.append(f"{name}: size {size} bytes, manifest says {want['size']}")
        else:
            to_hash.append(name)
    for name, got in zip(to_hash, _hash_many([folder / n for n in to_hash]), strict=True):
        if got.startswith("!"):
            problems.append(f"{name}: {got[1:]}")
        elif got != files[name][HASH]:
            problems.append(
                f"{name}: content changed ({HASH} {got[:12]}..., manifest {files[name][HASH][:12]}...)"
            )
    return problems


def verify(path: str | Path, state: dict[str, Any], *, process_group: Any = None) -> None:
    """Raise CheckpointCorrupt unless every file matches the manifest in `state`.

    Collective when torch.distributed is initialized: rank r hashes files r, r+W, ... and
    every rank gets every rank's findings, so all take the same decision.
    """
    files = state.get("files")
    if files is None:  # written before manifests had hashes: nothing to check against
        log.warning("checkpoint %s has no file hashes; loading it unverified", path)
        return
    rank, world = _rank_world(process_group)
    mine = check_files(path, files, sorted(files)[rank::world])
    problems = [p for found in _gather(mine, world, process_group) for p in found]
    if problems:
        raise CheckpointCorrupt(f"{Path(path).name}: " + "; ".join(problems))


def is_clean(state: dict[str, Any]) -> bool:
    """Trained without non-finite steps since the previous checkpoint (older ones: assumed)."""
    return bool(state.get("clean", True))


def refused(path: str | Path) -> str | None:
    """Why a checkpoint was refused at an earlier load, or None."""
    try:
        return (Path(path) / REFUSED_FILE).read_text().strip() or "refused"
    except OSError:
        return None


def _mark_refused(path: Path, reason: str) -> None:
    try:
        tmp = path / f".{REFUSED_FILE}.tmp"
        tmp.write_text(reason + "\n")
        os.replace(tmp, path / REFUSED_FILE)
    except OSError as e:  # a read-only folder: it is still skipped, just re-checked next time
        log.warning("could not mark %s refused: %s", path, e)


def _state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if optimizer is None:
        return {"model": get_model_state_dict(model)}
    msd, osd = get_state_dict(model, optimizer)
    return {"model": msd, "optim": osd}


def _atomic_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(json.dumps(data, sort_keys=True, default=str))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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
    before_commit: Callable[[], None] | None = None

    def done(self) -> bool:
        return self.future is None or self.future.done()

    def finish(self, *, prune_old: bool = True) -> Path:
        """Wait for the write; (rank 0) hash the files; run `before_commit` (every rank);
        (rank 0) rename the manifest into place, then prune unless `prune_old` is false.

        Rank 0's DCP save returns only after every rank's files are written (it gathers
        their results before writing `.metadata`), so it can hash all of them alone.
        """
        if self.finished:
            return self.path
        try:
            if self.future is not None:
                self.future.result()
            files = file_manifest(self.path) if self.rank == 0 else {}
            if self.before_commit is not None:
                self.before_commit()
            if self.rank == 0:
                _atomic_json(self.path / STATE_FILE, {**self.train_state, "files": files})
        except BaseException:
            self.discard()
            raise
        if self.rank == 0 and prune_old:
            prune(self.path.parent, self.keep)
        self.finished = True
        return self.path

    def discard(self) -> None:
        """(rank 0) remove the folder of a save that failed (a full disk): a partial
        checkpoint would only hold the space that is missing."""
        if self.rank == 0 and not (self.path / STATE_FILE).exists():
            shutil.rmtree(self.path, ignore_errors=True)


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
    before_commit: Callable[[], None] | None = None,
) -> PendingSave:
    """Save model and optimizer (sharded, every rank) and the train state (rank 0).

    Synchronous by default: returns a finished PendingSave. With `async_save`, returns at
    once after staging; call `finish()` before the next save (and before exiting).
    A process group of its own (gloo) keeps the background collectives apart from training's.
    `train_state["clean"]` (default true) says no non-finite step preceded it since the
    previous checkpoint; pruning keeps the newest clean checkpoint.
    """
    import torch.distributed.checkpoint as dcp

    path = step_dir(root, step)
    if rank == 0 and path.exists():  # a leftover of a save cut short, or a rollback
        shutil.rmtree(path)
    _barrier(process_group)
    path.mkdir(parents=True, exist_ok=True)
    sd = _state_dicts(model, optimizer)
    pending = PendingSave(
        path, step, {**train_state, "step": step}, rank, keep, before_commit=before_commit
    )
    if async_save:
        pending.future = dcp.async_save(sd, checkpoint_id=str(path), process_group=process_group)
        return pending
    try:
        dcp.save(sd, checkpoint_id=str(path), process_group=process_group)
    except BaseException:
        pending.discard()
        raise
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
    """Load a complete checkpoint into model (and optimizer) in place; returns its train state.

    Its files are verified against the manifest first (CheckpointCorrupt naming them)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    path = Path(path)
    state = read_state(path)
    verify(path, state, process_group=process_group)
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

    A checkpoint whose files fail verification or do not load is reported through
    `on_failure(path, reason)` (the reason names the file) and the next older one is tried.
    One whose files fail verification is also marked refused (rank 0), so later loads skip
    it and pruning does not count it as good.
    A checkpoint of another model raises CheckpointMismatch at once.
    """
    for step, path in reversed(list_checkpoints(root)):
        if max_step is not None and step > max_step:
            continue
        earlier = refused(path)
        if earlier is not None:
            log.warning("checkpoint %s was refused before (%s); skipping it", path, earlier)
            if on_failure is not None:
                on_failure(path, f"refused at an earlier load: {earlier}")
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
            log.warning("checkpoint %s refused (%s); trying an older one", path, reason)
            # a hash mismatch is permanent; other errors may be passing (a file system hiccup)
            if isinstance(e, CheckpointCorrupt) and _rank_world(process_group)[0] == 0:
                _mark_refused(path, reason)
            if on_failure is not None:
                on_failure(path, reason)
    return None


def prune_plan(checkpoints: list[tuple[int, bool]], keep: int) -> list[int]:
    """The steps to delete among (step, good) pairs, oldest first: all but the newest
    `keep`, except the newest good (clean, not refused) one, which is never deleted."""
    keep = max(keep, 1)
    kept = {s for s, _ in checkpoints[-keep:]}
    good = [s for s, ok in checkpoints if ok]
    if good:
        kept.add(good[-1])
    return [s for s, _ in checkpoints if s not in kept]


def _good(path: Path) -> bool:
    if refused(path) is not None:
        return False
    try:
        return is_clean(read_state(path))
    except ValueError:
        return False


def prune(root: str | Path, keep: int) -> list[Path]:
    """Apply `prune_plan` to the complete checkpoints under root, and delete incomplete
    folders older than the oldest one kept (saves cut short). Returns what was deleted."""
    done = list_checkpoints(root)
    drop = set(prune_plan([(s, _good(p)) for s, p in done], keep))
    removed = []
    for s, p in done:
        if s in drop:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    kept = [s for s, _ in done if s not in drop]
    if kept:
        for step, p in list_checkpoints(root, complete_only=False):
            if step < kept[0] and not (p / STATE_FILE).exists():
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def _rank_world(group: Any) -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def _gather(obj: Any, world: int, group: Any) -> list[Any]:
    import torch.distributed as dist

    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj, group=group)
    return out


def _barrier(group: Any) -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier(group=group)
