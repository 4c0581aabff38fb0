"""The `list` stage: each dataset's inputs inventoried once, in a job.

Every dataset is listed by one task (`esm3.data.inventory`: a parallel walk into Parquet,
then for ESMAtlas/AFDB the metadata prefilter) before its other stages are planned: no
submitting process globs a database. For a structure dataset (AFDB, the ESM Atlas: up to
hundreds of millions of files) the submitting process reads only the inventory's counts
and every structure task reads its own row range; a sequence dataset's few files (one
per FASTA, JGI genome or OAS unit) are read from its inventory for per-file tasks. The
listing is kept in <data>/inventory/<dataset>/ with `listing.json` (written last) and is
reused while the dataset's patterns and prefilter are the same; `esm3 preprocess list`
walks again (files added on disk).

Demo datasets derived from experimental structures (`proxy_from_experimental`) are small
and listed by the submitting process, as their derived files are made by a stage.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path

from esm3.data.inventory import (
    Prefilter,
    count_rows,
    iter_paths,
    prefilter_files,
    sorted_metadata,
    write_inventory,
)
from jobs.arrays import job_cpus
from jobs.stages.config import DatasetConfig, Inputs, PreprocessConfig, check_kinds
from jobs.stages.runner import Layout, Stage, say, stage_resources, write_text_atomic

WALK_THREADS_PER_CPU = 8  # directory listings wait on the file system, not on the CPU


def listed_here(d: DatasetConfig) -> bool:
    """Structure datasets go through the `list` stage; demo proxies are listed in the driver."""
    return d.type == "structure" and not d.proxy_from_experimental


def prefilter_of(cfg: PreprocessConfig, d: DatasetConfig, metadata: str | None) -> Prefilter | None:
    """The metadata prefilter of a dataset: ESMAtlas pLDDT and pTM, AFDB global pLDDT
    (when the config names AFDB metadata); None without metadata."""
    if not metadata:
        return None
    if d.format == "esmatlas":
        f = cfg.structures.esmatlas
        return Prefilter(metadata, f.min_plddt, f.min_ptm, d.plddt_scale)
    if d.format == "afdb":
        return Prefilter(metadata, cfg.structures.afdb.min_plddt, None, d.plddt_scale,
                         strip_model_suffix=True)  # fmt: skip
    return None


def listing_key(patterns: list[str], prefilter: Prefilter | None) -> str:
    """What a listing depends on: the expanded patterns and the prefilter."""
    doc = {"patterns": patterns, "prefilter": vars(prefilter) if prefilter else None}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Listing:
    """A dataset's inventory: `files` (the plain structure files tasks read, after the
    prefilter) and `archives` (tar bundles) with their row counts."""

    folder: str
    files: str
    n_files: int
    archives: str
    n_archives: int
    summary: dict

    @property
    def metadata(self) -> str | None:
        """The source's metadata table as Parquet sorted by id, when the listing made one."""
        name = self.summary.get("metadata")
        return str(Path(self.folder) / name) if name else None


def load_listing(folder: Path, key: str) -> Listing | None:
    """The listing in `folder` if it is complete and made for `key`, else None."""
    meta = folder / "listing.json"
    if not meta.exists():
        return None
    doc = json.loads(meta.read_text())
    if doc.get("key") != key:
        return None
    files, archives = folder / doc["files"], folder / "archives.parquet"
    return Listing(str(folder), str(files), count_rows(files), str(archives),
                   count_rows(archives), doc)  # fmt: skip


def list_task(
    ws: str, run_id: str, dataset: str, patterns: list[str], out: str, key: str,
    prefilter: Prefilter | None, again: bool = False,
) -> dict:  # fmt: skip
    """Inventory one dataset's inputs into `out` (skipped when its listing is current,
    unless `again`)."""
    folder = Path(out)
    done = load_listing(folder, key)
    if done is not None and not again:
        return {**done.summary, "skipped": True}
    (folder / "listing.json").unlink(missing_ok=True)  # the old listing is gone from here on
    threads = WALK_THREADS_PER_CPU * job_cpus()
    s = write_inventory(patterns, folder, threads=threads, where=f"dataset '{dataset}'")
    doc = {"key": key, "dataset": dataset, "files": "files.parquet", "listed_files": s.files,
           "archives": s.archives, "bytes": s.bytes}  # fmt: skip
    if prefilter is not None:  # the tasks' metadata: Parquet sorted by id, whatever the source
        if not prefilter.metadata.endswith(".parquet"):
            sorted_metadata(prefilter.metadata, folder / "metadata.parquet")
            prefilter = replace(prefilter, metadata=str(folder / "metadata.parquet"))
            doc["metadata"] = "metadata.parquet"
    if prefilter is not None and s.files:
        counts = prefilter_files(folder / "files.parquet", folder / "selected.parquet", prefilter)
        doc |= {"files": "selected.parquet", "prefilter": counts}
    write_text_atomic(folder / "listing.json", json.dumps(doc, indent=1))
    kept = (
        f" ({doc['prefilter']['kept']} after the metadata prefilter)" if "prefilter" in doc else ""
    )
    say("list", f"{dataset}: {s.files} files{kept}, {s.archives} archives, "
        f"{s.bytes / 1e9:.2f} GB -> {folder}")  # fmt: skip
    return doc


def plan_list(
    ws: Path, run_id: str, cfg: PreprocessConfig, patterns: dict[str, list[str]],
    metadata: dict[str, Path | None], lay: Layout, *, again: bool = False,
) -> tuple[Stage, dict[str, str]]:  # fmt: skip
    """(the `list` stage for the datasets whose listing is missing or stale, or all of them
    with `again`; the listing key of every listed dataset)."""
    items, keys = [], {}
    for d in cfg.datasets:
        if d.name not in patterns:
            continue
        meta = str(metadata[d.name]) if metadata.get(d.name) else None
        pf = prefilter_of(cfg, d, meta)
        keys[d.name] = key = listing_key(patterns[d.name], pf)
        folder = lay.inventory(d.name)
        if again or load_listing(folder, key) is None:
            items.append((str(ws), run_id, d.name, patterns[d.name], str(folder), key, pf, again))
    return Stage("list", list_task, items, [], stage_resources(cfg, "list")), keys


def with_listings(cfg: PreprocessConfig, inputs: Inputs, lay: Layout, keys: dict[str, str]) -> None:
    """Fill `inputs.listings` with the current listings. A listed sequence dataset's files
    (at most ~10^5 in the paper's databases: one per JGI genome or OAS unit) are read from
    its inventory into `inputs.datasets` for the sequence pipeline's per-file tasks, and
    checked to be of the dataset's kind (ConfigError naming the file)."""
    inputs.listings = listings(lay, keys)
    for d in cfg.of_type("sequence"):
        got = inputs.listings.get(d.name)
        if got is not None:
            files = [Path(p) for f in (got.files, got.archives) for p in iter_paths(f)]
            check_kinds(d, files, f"dataset '{d.name}'")
            inputs.datasets[d.name] = files


def listings(lay: Layout, keys: dict[str, str]) -> dict[str, Listing]:
    """The current listing of each dataset that has one."""
    out = {}
    for name, key in keys.items():
        got = load_listing(lay.inventory(name), key)
        if got is not None:
            out[name] = got
    return out
