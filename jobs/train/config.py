"""Training configs: loading (TOML + key=value overrides) and every check that can be made
before anything is recorded or submitted: the config (keys, values, stages), the data
(every dataset's shards and cluster files exist and are readable), the batch against the
world size and a rank's memory, and any checkpoint the run would start from (same model).
"""

from __future__ import annotations

from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

from jobs import workspace as wsp
from jobs.clusters import ClusterProfile
from jobs.config import ConfigError, apply_overrides, from_dict, read_toml

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "train"


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Any:
    """The TrainConfig of a TOML file (default: tiny.toml) with key=value overrides."""
    from esm3.train.config import TrainConfig

    p = Path(path) if path else CONFIG_DIR / "tiny.toml"
    if not p.exists() and (CONFIG_DIR / f"{p}.toml").exists():
        p = CONFIG_DIR / f"{p}.toml"  # a config by name: tiny, esm3_1.4b, ...
    data = apply_overrides(read_toml(p), list(overrides or []))
    try:
        return from_dict(TrainConfig, data)
    except ConfigError:
        raise
    except ValueError as e:  # the components' own checks (model, tasks, train config)
        raise ConfigError(f"{p}: {e}") from e


def config_dict(obj: Any) -> Any:
    """A config as plain data (init fields only), what `runs.config` stores."""
    if is_dataclass(obj):
        return {f.name: config_dict(getattr(obj, f.name)) for f in fields(obj) if f.init}
    if isinstance(obj, (list, tuple)):
        return [config_dict(x) for x in obj]
    if isinstance(obj, dict):
        return {k: config_dict(v) for k, v in obj.items()}
    return obj


def data_root(ws: Path) -> Path:
    return Path(ws) / "data"


def ckpt_dir(ws: Path, run_id: str) -> Path:
    return wsp.run_dir(ws, run_id) / "checkpoints"


def check_inputs(
    cfg: Any,
    ws: Path,
    world_size: int,
    profile: ClusterProfile | None = None,
    tasks_per_node: int = 1,
    *,
    build_stores: bool = True,
) -> dict[str, Any]:
    """Everything checkable before submission; one-line ConfigError naming the problem.

    Data: each dataset's store is found through manifests and checked from its store.json
    (present, every file at its written size, this format version): no record is read. An
    ad-hoc dataset (globs) is converted into its store here unless `build_stores` is false
    (--dry-run: it then reports the store as still to be built).
    With a profile, a step must also fit the memory one rank gets there.
    Returns facts for the run record: param_count, per-dataset record counts.
    """
    from esm3.train import checkpoint as ckpt
    from esm3.train.config import TrainConfigError
    from esm3.train.stores import DataError, store_meta
    from esm3.train.validation import validation_files

    try:
        cfg.validate()
        cfg.check_world_size(world_size)
    except TrainConfigError as e:
        raise ConfigError(str(e)) from e
    if profile is not None:
        check_memory(cfg, profile, world_size, tasks_per_node)
    records: dict[str, int | None] = {}
    try:
        for spec in cfg.data.datasets:
            meta = store_meta(spec, data_root(ws), build=build_stores)
            records[spec.name] = None if meta is None else int(meta["rows"])
    except DataError as e:
        raise ConfigError(f"config key 'data.datasets': {e}") from e
    if cfg.validation.every and cfg.validation.files:
        try:
            validation_files(cfg.validation, data_root(ws), read_schemas=build_stores)
        except DataError as e:
            raise ConfigError(f"config key 'validation.files': {e}") from e
    mcfg = cfg.model_config()
    if cfg.model.stage1_checkpoint:
        _check_stage1(cfg)
    if cfg.checkpoint.init_from:
        try:
            state = ckpt.read_state(cfg.checkpoint.init_from)
            ckpt.check_compatible(state, ckpt.fingerprint(mcfg), cfg.checkpoint.init_from)
        except ValueError as e:
            raise ConfigError(f"config key 'checkpoint.init_from': {e}") from e
    return {
        "param_count": model_param_count(mcfg),
        "records": records,
    }


def model_param_count(mcfg: Any) -> int:
    """Parameters of an ESM3 or a structure tokenizer config, from the config alone."""
    from esm3.model.config import param_count
    from esm3.model.vqvae.config import VQVAEConfig
    from esm3.model.vqvae.model import vqvae_param_count

    return vqvae_param_count(mcfg) if isinstance(mcfg, VQVAEConfig) else param_count(mcfg)


def _check_stage1(cfg: Any) -> None:
    """Stage 2's stage-1 checkpoint: present, a stage-1 tokenizer, the config's encoder."""
    from esm3.train import checkpoint as ckpt
    from esm3.train.vqvae import check_stage1

    path = cfg.model.stage1_checkpoint
    try:
        check_stage1(ckpt.read_state(ckpt.resolve(path)), cfg.model_config())
    except (OSError, ValueError, KeyError) as e:  # CheckpointMismatch is a ValueError
        raise ConfigError(f"config key 'model.stage1_checkpoint': {path}: {e}") from e


def _size(n: float) -> str:
    """Bytes as GiB, TiB or PiB, one decimal."""
    units = ("GiB", "TiB", "PiB")
    i = 0
    while i < len(units) - 1 and n >= 2 ** (40 + 10 * i):
        i += 1
    return f"{n / 2 ** (30 + 10 * i):,.1f} {units[i]}"


def check_memory(cfg: Any, profile: ClusterProfile, world_size: int, tasks_per_node: int) -> None:
    """Refuse a batch whose step cannot fit one rank's memory on this profile (a lower bound
    of the step against what the profile gives a rank; skipped where that is unknown)."""
    budget = profile.memory_per_rank(tasks_per_node)
    if budget is None:
        return
    avail, what = budget
    need = cfg.min_step_bytes(world_size)
    if need > avail:
        raise ConfigError(
            f"config key '{_batch_key(cfg)}': {_batch_words(cfg)} over {world_size} rank(s) need "
            f"at least {_size(need)} per rank, more than the {_size(avail)} a rank has on profile "
            f"'{profile.name}' ({what}); lower {_batch_key(cfg)} or the context length, or use "
            "more ranks"
        )


def _batch_key(cfg: Any) -> str:
    return "data.batch_tokens" if cfg.data.batch_tokens else "data.batch_size"


def _batch_words(cfg: Any) -> str:
    """The step's batch in words: what the config counts."""
    if cfg.data.batch_tokens:
        return f"{cfg.data.batch_tokens} tokens per step"
    ctx = max(s.context_length for s in cfg.stages)
    return f"{cfg.data.batch_size} samples of up to {ctx} tokens"
