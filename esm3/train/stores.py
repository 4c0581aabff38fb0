"""Which training store a dataset of a training config reads.

A dataset names its store in one of two ways:
- `source = "<preprocess config>:<dataset>"`: the store that preprocessing wrote, found
  through `<data>/preprocess/<config>/manifest.json` (nothing but the manifest and the
  store's own store.json is opened to find and check it);
- `shards` (+ `clusters`) globs, for ad-hoc data: converted once by the same writer into
  `<data>/stores/adhoc/<name>-<fingerprint>/`, the fingerprint covering every input file's
  path, size and modification time, so changed inputs give a new store.
Inverse-folded sequences (`inverse_folded` globs) are generated after preprocessing: a
dataset that has them is converted ad hoc too, from its manifest's shards and clusters.
"""

from __future__ import annotations

import glob
import json
from pathlib import Path
from typing import Any

from esm3.data.store import StoreError, StoreSources, read_meta, sources_fingerprint, write_store
from esm3.train.config import DatasetSpec


class DataError(ValueError):
    """Training data that cannot be used; the message names the dataset and file."""


def resolve_paths(patterns: list[str], root: str | Path, what: str) -> list[Path]:
    """Files matching `patterns` (globs; relative ones under `root`), sorted; DataError when
    a pattern matches nothing."""
    out: list[Path] = []
    for pat in patterns:
        full = pat if Path(pat).is_absolute() else str(Path(root) / pat)
        hits = sorted(glob.glob(full, recursive=True))
        if not hits:
            raise DataError(f"{what}: no file matches {full!r}")
        out += [Path(h) for h in hits]
    return list(dict.fromkeys(out))


def manifest_path(root: str | Path, config: str) -> Path:
    return Path(root) / "preprocess" / config / "manifest.json"


def manifest_entry(
    spec: DatasetSpec, root: str | Path, *, need_store: bool = True
) -> dict[str, Any]:
    """The manifest's entry for a dataset named by `source`."""
    config, _, name = spec.source.partition(":")
    where = f"dataset {spec.name!r} (source {spec.source!r})"
    path = manifest_path(root, config)
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(
            f"{where}: no preprocessing manifest {path}; run `esm3 preprocess all --config "
            f"{config}` first"
        ) from None
    except (OSError, ValueError) as e:
        raise DataError(f"{where}: manifest {path} is unreadable ({e})") from e
    entry = manifest.get("datasets", {}).get(name)
    if entry is None:
        have = ", ".join(sorted(manifest.get("datasets", {}))) or "none"
        raise DataError(f"{where}: manifest {path} has no dataset {name!r} (it has: {have})")
    if need_store and not entry.get("store"):
        raise DataError(
            f"{where}: manifest {path} names no store for {name!r}; re-run the preprocessing "
            "(its last stage writes the stores)"
        )
    return entry


def record_files(spec: DatasetSpec, root: str | Path) -> tuple[list[Path], list[Path]]:
    """A dataset's record shards and cluster files (its manifest's, or its globs')."""
    if spec.source:
        entry = manifest_entry(spec, root, need_store=False)
        clusters = [Path(entry["clusters"])] if entry.get("clusters") else []
        return [Path(p) for p in entry["shards"]], clusters
    what = f"dataset {spec.name!r}"
    records = resolve_paths(spec.shards, root, f"{what} shards")
    clusters = resolve_paths(spec.clusters, root, f"{what} clusters") if spec.clusters else []
    return records, clusters


def adhoc_sources(spec: DatasetSpec, root: str | Path) -> StoreSources:
    """The files an ad-hoc store is written from."""
    what = f"dataset {spec.name!r}"
    records, clusters = record_files(spec, root)
    generated = (
        resolve_paths(spec.inverse_folded, root, f"{what} inverse_folded")
        if spec.inverse_folded
        else []
    )
    return StoreSources(records, clusters, generated)


def adhoc_dir(spec: DatasetSpec, root: str | Path, sources: StoreSources) -> Path:
    try:
        digest = sources_fingerprint(sources, salt=f"{spec.name}:{spec.type}")
    except FileNotFoundError as e:
        raise DataError(f"dataset {spec.name!r}: {e.filename} is missing") from None
    return Path(root) / "stores" / "adhoc" / f"{spec.name}-{digest}"


def store_path(spec: DatasetSpec, root: str | Path, *, build: bool = True) -> Path:
    """The store a dataset reads; an ad-hoc one is written first when missing (unless
    `build` is false: then its path, which may not exist yet)."""
    if spec.source and not spec.inverse_folded:
        return Path(manifest_entry(spec, root)["store"])
    sources = adhoc_sources(spec, root)
    path = adhoc_dir(spec, root, sources)
    if build and not (path / "store.json").exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            write_store(path, spec.name, spec.type, sources)
        except StoreError as e:
            raise DataError(f"dataset {spec.name!r}: {e}") from e
    return path


def store_meta(spec: DatasetSpec, root: str | Path, *, build: bool = True) -> dict[str, Any] | None:
    """The checked store.json of a dataset's store (None: an ad-hoc store not built yet and
    `build` false). DataError names the dataset when the store is missing, truncated or of
    another format version, or of another type than the config says."""
    path = store_path(spec, root, build=build)
    adhoc = not spec.source or bool(spec.inverse_folded)
    if adhoc and not build and not (path / "store.json").exists():
        return None
    try:
        meta = read_meta(path)
    except StoreError as e:
        raise DataError(f"dataset {spec.name!r}: {e}") from e
    if meta["type"] != spec.type:
        raise DataError(
            f"dataset {spec.name!r}: the config says type {spec.type!r}, its store {path} holds "
            f"{meta['type']!r} records"
        )
    return meta
