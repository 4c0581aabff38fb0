"""Running a stage graph, the data layout of a preprocessing config, and what jobs record.

A pipeline is a list of `Stage`s (one submitit array each) with the names of the stages it
needs. On SLURM every stage is submitted at once, each with `--dependency=afterok:<ids>`
on the arrays it needs, so the whole pipeline sits in the scheduler and runs without the
driver; the driver then follows the stages in order. On the local executor (no
scheduler, no dependencies) stages are submitted one after the other. A failed stage
cancels what is still queued, so no job waits forever on a dependency that cannot be met.

Every task skips work whose output exists (the library's stages write to a temporary name
and rename), so running the same command again after a crash or `scancel` redoes only what
was lost and ends with the same files and numbers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from esm3.data import duck
from esm3.metrics.lake import now, write_rows
from jobs import launch
from jobs import workspace as wsp
from jobs.arrays import Items, job_cpus
from jobs.clusters import ClusterProfile, Resources
from jobs.config import to_dict
from jobs.errors import UserError
from jobs.stages.config import PreprocessConfig, StageResources

log = logging.getLogger("esm3.preprocess")


# --- inside jobs ---------------------------------------------------------------------------


def say(stage: str, message: str) -> None:
    """A log line for the job's log (SLURM's output file; the local executor's log file)."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    print(f"{stamp} esm3.preprocess {stage}: {message}", flush=True)


def job_memory_limit(fraction: float = 0.8) -> str | None:
    """A memory limit for mmseqs (--split-memory-limit) / DuckDB from the job's SLURM
    allocation (fraction of it, leaving room for the process itself); None outside SLURM
    or without a memory request."""
    mb = os.environ.get("SLURM_MEM_PER_NODE", "")
    per_cpu = os.environ.get("SLURM_MEM_PER_CPU", "")
    total = int(mb) if mb.isdigit() else int(per_cpu) * job_cpus() if per_cpu.isdigit() else 0
    if mb.isdigit():  # in a task's process pool each worker has its share of the node's
        total //= max(1, int(os.environ.get("ESM3_POOL_WORKERS", "1") or 1))
    return f"{int(total * fraction)}M" if total > 0 else None


@dataclass(frozen=True)
class InAllocation:
    """A stage task `fn(ws, run_id, ...)` run with every DuckDB connection it opens under the
    job's memory limit and CPUs, spilling to a folder of this task in the run's directory
    (removed when the task ends)."""

    fn: Callable[..., Any]

    def __call__(self, ws: str, run_id: str, *args: Any) -> Any:
        scratch = wsp.run_dir(Path(ws), run_id) / "duckdb-tmp"
        scratch.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=scratch) as tmp:
            with duck.limits(job_memory_limit(), job_cpus(), tmp):
                return self.fn(ws, run_id, *args)


def _marker(ws: str | Path, run_id: str, kind: str, key: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in key)
    return wsp.run_dir(Path(ws), run_id) / "recorded" / kind / safe


def output_key(ws: str | Path, output: str | Path) -> str:
    """The key of the rows that describe one output: its path in the workspace. A re-run
    writes them again under the same key and the views keep the newest write only."""
    out, root = Path(output).resolve(), Path(ws).resolve()
    return out.relative_to(root).as_posix() if out.is_relative_to(root) else out.as_posix()


def _batch(rows: Sequence[dict], run_id: str, key: str, stamp_col: str) -> list[dict]:
    """Rows of one write: one key and one time stamp, which is how the views tell this
    write from an earlier one of the same output."""
    stamp = now()
    return [{**r, "run_id": run_id, "output_key": key, stamp_col: stamp} for r in rows]


def record_rejects(ws: str | Path, run_id: str, key: str, rejects: Sequence[dict]) -> int:
    """Write a task's reject rows to the `rejects` table with the run id and the output's
    key (`output_key`), once per run and key (a requeued task does not write them twice);
    the `rejects` view shows the newest write per key, so a re-run replaces them.
    Returns the number of rejects."""
    marker = _marker(ws, run_id, "rejects", key)
    if rejects and not marker.exists():
        rows = _batch(rejects, run_id, key, "time")
        for start in range(0, len(rows), 100_000):
            write_rows(Path(ws), "rejects", rows[start : start + 100_000])
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
    return len(rejects)


def record_stats(ws: str | Path, run_id: str, key: str, table: str, rows: list[dict]) -> None:
    """Write `dataset_stats` / `token_stats` rows once per run and output key; the views
    show the newest write per key."""
    marker = _marker(ws, run_id, table, key)
    if rows and not marker.exists():
        write_rows(Path(ws), table, _batch(rows, run_id, key, "computed_at"))
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()


# --- data layout ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """Where a config's data lives: <workspace>/data/preprocess/<config name>/..."""

    root: Path

    @classmethod
    def of(cls, ws: Path, cfg: PreprocessConfig) -> Layout:
        return cls(Path(ws) / "data" / "preprocess" / cfg.name)

    def seq(self, dataset: str) -> Path:
        return self.root / "sequences" / dataset

    def struct(self, dataset: str) -> Path:
        return self.root / "structures" / dataset

    def clusters(self, dataset: str) -> Path:
        return self.root / "clusters" / dataset

    def level_file(self, dataset: str, level: float) -> Path:
        return self.clusters(dataset) / f"level-{level:g}.parquet"

    def expanded_file(self, dataset: str) -> Path:
        return self.clusters(dataset) / "expanded.parquet"

    def final_clusters(self, dataset: str) -> Path:
        return self.clusters(dataset) / "final.parquet"

    def inventory(self, dataset: str) -> Path:
        """The dataset's input inventory (the `list` stage, `jobs.stages.inventory`)."""
        return self.root / "inventory" / dataset

    def store(self, dataset: str) -> Path:
        """The dataset's training store (esm3.data.store), the pipeline's last output."""
        return self.root / "stores" / dataset

    @property
    def validation(self) -> Path:
        return self.root / "sequences" / "validation.parquet"

    @property
    def codebook(self) -> Path:
        return self.root / "structure-codebook.npz"

    @property
    def encoder(self) -> Path:
        """A trained VQ-VAE's encoder, exported from its checkpoint (`[codebook] vqvae`)."""
        return self.root / "structure-encoder.pt"

    def tokenizer(self, kind: str) -> Path:
        """The structure tokenizer's file: the k-means codebook or the VQ-VAE encoder."""
        return self.encoder if kind == "vqvae" else self.codebook

    def tokens_dir(self, dataset: str, kind: str) -> Path:
        """Shards with structure tokens: one folder per tokenizer kind, so tokens of one are
        never taken for the other's."""
        return self.struct(dataset) / ("tokens-vqvae" if kind == "vqvae" else "tokens")

    @property
    def interpro(self) -> Path:
        return self.root / "interpro"

    @property
    def vocabulary(self) -> Path:
        """The function / residue-annotation vocabulary file training reads."""
        return self.root / "vocabulary.json"

    @property
    def work(self) -> Path:
        return self.root / "tmp"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"


def lock_path(layout: Layout) -> Path:
    """One preprocessing run at a time per workspace and config (`jobs.locks`)."""
    return layout.root / ".preprocess.lock"


def clean_scratch(layout: Layout) -> list[tuple[Path, int]]:
    """Remove the scratch folders (`tmp`: mmseqs and DuckDB work space) that killed tasks
    left under the config's data; only while holding its lock, so no task of another run
    still uses them. Returns (folder, bytes) of each one removed."""
    removed = []
    for d in sorted(layout.root.rglob("tmp")) if layout.root.is_dir() else []:
        if d.is_dir() and not d.is_symlink():
            size = sum(f.stat().st_size for f in d.rglob("*") if f.is_file() and not f.is_symlink())
            shutil.rmtree(d, ignore_errors=True)
            removed.append((d, size))
    return removed


FINGERPRINT_SKIP = ("name", "resources", "tokens")  # keys that do not change the data files


def check_fingerprint(layout: Layout, cfg: PreprocessConfig) -> None:
    """Refuse to mix outputs of different configs in one data folder (skipping would reuse
    stale shards). Writes the fingerprint on first use."""
    data = {k: v for k, v in to_dict(cfg).items() if k not in FINGERPRINT_SKIP}
    # the VQ-VAE tokenizer writes tokens of its own (tokens-vqvae/; its encoder file says
    # whose), so choosing it leaves the data of every other stage as it was
    data.get("codebook", {}).pop("vqvae", None)
    digest = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]
    path = layout.root / "config.json"
    if path.exists():
        old = json.loads(path.read_text()).get("fingerprint")
        if old != digest:
            raise UserError(
                f"{layout.root} holds data made with a different config (fingerprint {old}, "
                f"now {digest}); give this config another name (name=...) or remove that folder"
            )
        return
    layout.root.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps({"fingerprint": digest, "config": data}, indent=1,
                                       sort_keys=True))  # fmt: skip


def write_text_atomic(path: Path, text: str) -> None:
    """`path` whole or not at all; a failed write (a full disk) leaves no temporary file."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
        tmp.replace(path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.filename is None and e.errno is not None:  # name the file in the error
            raise OSError(e.errno, os.strerror(e.errno), str(path)) from e
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# --- the stage graph -----------------------------------------------------------------------


@dataclass
class Stage:
    """fn(*item) for every item, after every stage named in `after` succeeded; submitted
    as one or more arrays (`launch.submit_array`), several items per task where
    `resources.items_per_task` or the profile's `max_tasks_per_stage` says so. `items`
    is a list of argument tuples or an `ItemSource` the tasks read their ranges from."""

    name: str
    fn: Callable[..., Any]
    items: Items
    after: list[str] = field(default_factory=list)
    resources: Resources | None = None


def stage_resources(cfg: PreprocessConfig, stage: str) -> Resources | None:
    """The config's resources for a stage (`structure-cluster` uses those of `cluster`)."""
    base = {"structure-cluster": "cluster", "structure-expand": "expand"}.get(stage, stage)
    r: StageResources | None = cfg.resources.get(stage) or cfg.resources.get(base)
    if r is None:
        return None
    return Resources(
        cpus_per_task=r.cpus_per_task or None,
        mem_gb=r.mem_gb or None,
        time_min=r.time_min or None,
        items_per_task=r.items_per_task or None,
    )


def _order(stages: Iterable[Stage]) -> list[Stage]:
    stages = [s for s in stages if len(s.items)]
    names = {s.name for s in stages}
    done: list[Stage] = []
    placed: set[str] = set()
    pending = list(stages)
    while pending:
        ready = [s for s in pending if all(a in placed or a not in names for a in s.after)]
        if not ready:
            raise ValueError(f"stage graph has a cycle: {[s.name for s in pending]}")
        for s in ready:
            done.append(s)
            placed.add(s.name)
        pending = [s for s in pending if s.name not in placed]
    return done


def _scancel(profile: ClusterProfile, job_ids: list[str]) -> None:
    parents = sorted({j.split("_")[0] for j in job_ids})
    if parents:
        env = launch.slurm_env(profile)
        subprocess.run(["scancel", *parents], env=env, capture_output=True, timeout=60)


def _after_ids(st: Stage, subs: dict[str, launch.Submission]) -> list[str]:
    """The arrays of every stage `st` needs (each stage may have several)."""
    return list(dict.fromkeys(i for a in st.after if a in subs for i in subs[a].array_ids))


def run_stages(
    ws: Path,
    profile: ClusterProfile,
    run_id: str,
    stages: Iterable[Stage],
    *,
    progress: bool | None = None,
    timeout_s: float | None = None,
) -> dict[str, list[Any]]:
    """Submit the graph (all at once with afterok dependencies on SLURM, each array of a
    stage on every array of the stages it needs; one stage after another on the local
    executor), wait for every stage, return the per-item results by stage name.

    Raises launch.JobFailed naming the stage, job and item; on SLURM it first cancels
    what is still queued or running of this graph."""
    order = _order(stages)
    slurm = profile.executor == "slurm"
    limit = launch.array_size_limit(profile)  # asked once for the whole graph
    subs: dict[str, launch.Submission] = {}
    results: dict[str, list[Any]] = {}

    def submit(st: Stage) -> launch.Submission:
        res = st.resources or Resources()
        ids = _after_ids(st, subs) if slurm else []
        if ids:
            res = replace(res, dependency="afterok:" + ":".join(ids))
        sub = launch.submit_array(ws, profile, run_id=run_id, stage=st.name,
                                  fn=InAllocation(st.fn), items=st.items, resources=res,
                                  max_array_size=limit)  # fmt: skip
        assert sub.plan is not None
        note(f"{st.name}: {sub.plan.describe()} submitted ({', '.join(sub.array_ids[:5])}"
             f"{', ...' if len(sub.array_ids) > 5 else ''})")  # fmt: skip
        return sub

    try:
        if slurm:
            for st in order:
                subs[st.name] = submit(st)
        for st in order:
            sub = subs.get(st.name) or submit(st)
            subs[st.name] = sub
            results[st.name] = sub.wait(progress=progress, timeout_s=timeout_s)
            skipped = sum(1 for r in results[st.name] if isinstance(r, dict) and r.get("skipped"))
            extra = f", {skipped} already done" if skipped else ""
            note(f"{st.name}: {len(results[st.name])} item(s) finished{extra}")
    except BaseException:
        if slurm:
            pending = [j for name, s in subs.items() if name not in results for j in s.job_ids]
            _scancel(profile, pending)
        raise
    return results


def plan_lines(profile: ClusterProfile, stages: Iterable[Stage]) -> list[str]:
    """What `run_stages` would submit, one line per stage: items, tasks and arrays."""
    limit = launch.array_size_limit(profile)
    lines = [f"  arrays of at most {limit - 1} task(s) (MaxArraySize {limit})"]
    for st in _order(stages):
        plan = launch.plan_stage(profile, len(st.items), st.resources, limit)
        lines.append(f"  {st.name}: {plan.describe()}; after {', '.join(st.after) or '-'}")
    return lines


def plan_scripts(
    ws: Path, profile: ClusterProfile, folder: Path, stages: Iterable[Stage], max_array_size: int
) -> list[tuple[str, str]]:
    """(title, sbatch script) of every array `run_stages` would submit on SLURM, nothing
    submitted; a dependency names the arrays it waits for as <stage#k>."""
    out: list[tuple[str, str]] = []
    arrays_of: dict[str, list[str]] = {}
    for st in _order(stages):
        res = st.resources or Resources()
        ids = [i for a in st.after for i in arrays_of.get(a, [])]
        if ids:
            res = replace(res, dependency="afterok:" + ":".join(ids))
        scripts = launch.array_scripts(ws, profile, folder, stage=st.name, n_items=len(st.items),
                                       resources=res, max_array_size=max_array_size)  # fmt: skip
        arrays_of[st.name] = [f"<{st.name}#{k}>" for k in range(len(scripts))]
        out += [(f"{st.name}#{k}", text) for k, text in enumerate(scripts)]
    return out


def note(message: str) -> None:
    """Driver progress: a log line (stderr), also when not at a terminal."""
    log.info(message)
    if not sys.stderr.isatty():
        print(f"esm3.preprocess: {message}", file=sys.stderr, flush=True)
