"""Benchmarks of the training store and its loader (DESIGN.md, "Data at scale").

Synthetic sequence datasets of 10^5, 10^6 and 10^7 records (lognormal lengths, mean ~330
residues; Swiss-Prot amino-acid composition; identity clusters of Zipf-distributed sizes,
members scattered over the shards) are written streaming as Parquet shards (id, sequence,
length) and a (center, member) clusters file. At each size, each in a fresh child process:

- store build: `write_store` (DuckDB on one thread, 1 GB memory limit): records/s, peak RSS;
- loader: the store loader (`load_dataset`: ad-hoc store already written, so this is the
  open) and, side by side, the in-memory loader it replaced (every shard read into Arrow
  tables, kept here as the baseline): start-up seconds, then `BATCHES` batches of
  `PER_RANK` samples on one core (torch and Arrow on one thread): samples/s, peak RSS
  (VmHWM), RssAnon and RssFile after the batches. The in-memory loader runs only where its
  estimated footprint fits half the memory available.

Ratios: store / in-memory at each size; largest size / smallest size for the store loader's
and the build's peak RSS (flat is ~1: memory follows the rank's slice, not the dataset).
The figures are taken with the store's files in the page cache (just written).

Reading the figures: the store loader's private memory (RssAnon) is what stays flat. Its
RssFile (mapped store pages, shared by the node's ranks and reclaimable) grows with the
pages the batches touch: every record read maps its page and the kernel's fault-around
neighbours (~64 KB each of the id, sequence and length buffers of its batch), so after
BATCHES x PER_RANK random draws it is bounded by the draws, not by the dataset, until the
draws cover the whole store. The build's peak follows DuckDB's memory limit.

Options (environment, as `make bench` passes none): ESM3_BENCH_STORE_SIZES=100000,1000000
(the sizes), ESM3_BENCH_SCRATCH=DIR (where the data is written; each size's files are
deleted after it). `python -m jobs.bench.bench_store --help` runs the suite alone.
"""

from __future__ import annotations

import math
import resource
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from jobs.bench import bench_row
from jobs.bench.synthetic import (
    LENGTH_MU,
    LENGTH_SIGMA,
    draw_lengths,
    draw_sequences,
    in_child,
    proc_status_mb,
    record_ids,
    residue_table,
    scratch_from_env,
)
from jobs.bench.synthetic import sizes_from_env as synthetic_sizes

SUITE = "store"
FULL_SIZES = (10**5, 10**6, 10**7)
QUICK_SIZES = (2_000, 20_000)
PER_RANK = 32  # samples per batch of one rank
BATCHES = 200
QUICK_BATCHES = 10
CONTEXT = 512
BUILD_MEMORY = "1GB"  # DuckDB memory limit of the store build
ROWS_PER_SHARD = 500_000
CHUNK_ROWS = 50_000  # records generated per step: the generator's memory

CLUSTER_ZIPF, CLUSTER_MAX = 2.2, 10_000  # ~67% singletons, mean size ~3.7


# --- synthetic data ----------------------------------------------------------------------


@dataclass(frozen=True)
class Synthetic:
    """A synthetic dataset on disk."""

    shards: list[str]
    clusters: str
    records: int
    residues: int
    centers: int
    seconds: float


def _write_records(out: Path, n: int, rng: np.random.Generator) -> tuple[list[str], int]:
    """Parquet shards of n records (id, sequence, length), chunk by chunk."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table, shards, residues = residue_table(), [], 0
    for first in range(0, n, ROWS_PER_SHARD):
        path = out / f"records-{first // ROWS_PER_SHARD:05d}.parquet"
        last = min(first + ROWS_PER_SHARD, n)
        with pq.ParquetWriter(path, _RECORD_SCHEMA(), compression="zstd") as w:
            for lo in range(first, last, CHUNK_ROWS):
                hi = min(lo + CHUNK_ROWS, last)
                lengths = draw_lengths(rng, hi - lo)
                w.write_table(
                    pa.table(
                        [record_ids(np.arange(lo, hi)), draw_sequences(rng, lengths, table),
                         pa.array(lengths)],
                        schema=_RECORD_SCHEMA(),
                    )
                )  # fmt: skip
                residues += int(lengths.sum())
        shards.append(str(path))
    return shards, residues


def _RECORD_SCHEMA() -> Any:  # noqa: N802 - a constant built lazily (pyarrow import)
    import pyarrow as pa

    return pa.schema([("id", pa.string()), ("sequence", pa.string()), ("length", pa.int32())])


def _scatter(n: int) -> Callable[[np.ndarray], np.ndarray]:
    """A permutation of [0, n) as an affine map (a * j + b) mod n with gcd(a, n) = 1: cluster
    members spread over every shard without holding a permutation of n values."""
    a = 1_000_003 % n or 1
    while math.gcd(a, n) != 1:
        a += 1
    b = n // 3
    return lambda j: (a * j + b) % n


def cluster_sizes(rng: np.random.Generator, n: int) -> Iterator[np.ndarray]:
    """Zipf-distributed cluster sizes summing to n, chunk by chunk."""
    left = n
    while left > 0:
        sizes = np.minimum(rng.zipf(CLUSTER_ZIPF, CHUNK_ROWS), min(CLUSTER_MAX, n // 10 + 1))
        ends = np.cumsum(sizes)
        cut = int(np.searchsorted(ends, left))
        if cut < len(sizes):
            sizes = sizes[: cut + 1]
            sizes[-1] -= int(ends[cut]) - left
        left -= int(sizes.sum())
        yield sizes


def _write_clusters(path: Path, n: int, rng: np.random.Generator) -> int:
    """(center, member) rows grouped by center, as mmseqs writes them; returns the count of
    centers. Every record is a member of exactly one cluster; its center is its first member."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    scatter, pos, centers = _scatter(n), 0, 0
    schema = pa.schema([("center", pa.string()), ("member", pa.string())])
    with pq.ParquetWriter(path, schema, compression="zstd") as w:
        for sizes in cluster_sizes(rng, n):
            members = scatter(np.arange(pos, pos + int(sizes.sum())))
            starts = np.repeat(np.cumsum(sizes) - sizes, sizes)
            w.write_table(
                pa.table([record_ids(members[starts]), record_ids(members)], schema=schema)
            )
            pos += int(sizes.sum())
            centers += len(sizes)
    return centers


def write_synthetic(out: Path, n: int, seed: int = 0) -> Synthetic:
    """n synthetic records as Parquet shards plus their clusters, under `out`."""
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shards, residues = _write_records(out, n, rng)
    centers = _write_clusters(out / "clusters.parquet", n, rng)
    return Synthetic(
        shards, str(out / "clusters.parquet"), n, residues, centers, time.perf_counter() - t0
    )


# --- child processes ---------------------------------------------------------------------


def _one_core() -> None:
    import pyarrow as pa
    import torch

    torch.set_num_threads(1)
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)


def _spec(data: Synthetic) -> Any:
    from esm3.train.config import DatasetSpec

    return DatasetSpec(name="synthetic", shards=data.shards, clusters=[data.clusters])


def build_child(data: Synthetic, root: str) -> dict[str, Any]:
    """Write the ad-hoc store `load_dataset` will open; time and memory of the write."""
    from esm3.data.store import write_store
    from esm3.train.stores import adhoc_dir, adhoc_sources

    spec = _spec(data)
    sources = adhoc_sources(spec, root)
    out = adhoc_dir(spec, root, sources)
    out.parent.mkdir(parents=True, exist_ok=True)
    before = proc_status_mb()
    t0 = time.perf_counter()
    meta = write_store(out, spec.name, spec.type, sources, memory_limit=BUILD_MEMORY, threads=1)
    seconds = time.perf_counter() - t0
    return {
        "seconds": seconds,
        "peak_mb": proc_status_mb()["VmHWM"],
        "imports_mb": before["VmRSS"],
        "store_mb": sum(meta["files"].values()) / 2**20,
        "centers": meta["centers"],
        "members": meta["members"],
    }


def load_in_memory(data: Synthetic) -> Any:
    """The baseline: the in-memory loader over the synthetic shards and clusters."""
    from esm3.data.store import StoreSources
    from jobs.bench.in_memory_loader import load_in_memory as read_all

    sources = StoreSources([Path(f) for f in data.shards], [Path(data.clusters)], [])
    return read_all("synthetic", "sequence", sources)


def _train_config(data: Synthetic) -> Any:
    from esm3.train.config import DataConfig, StageConfig, TrainConfig

    return TrainConfig(
        name="bench-store",
        data=DataConfig(datasets=[_spec(data)], batch_size=PER_RANK, workers=0),
        stages=[StageConfig(name="bench", steps=10**6, context_length=CONTEXT,
                            tracks=["sequence"])],
    )  # fmt: skip


def loader_child(kind: str, data: Synthetic, root: str, batches: int) -> dict[str, Any]:
    """Open the dataset the `kind` way ("store" or "in_memory"), then build `batches`
    batches of one rank on one core; times and memory."""
    _one_core()
    import pyarrow.compute  # noqa: F401 - imports outside the timed start-up
    import pyarrow.dataset  # noqa: F401 - pq.read_table imports it on first use
    import pyarrow.parquet  # noqa: F401

    import esm3.data.sampler  # noqa: F401
    from esm3.train.data import BatchBuilder, load_dataset

    cfg = _train_config(data)
    imports = proc_status_mb()
    t0 = time.perf_counter()
    if kind == "store":
        ds = load_dataset(cfg.data.datasets[0], root)
    else:
        ds = load_in_memory(data)
    startup = time.perf_counter() - t0
    opened = proc_status_mb()
    builder = BatchBuilder(cfg, {"synthetic": ds}, rank=0, per_rank=PER_RANK)
    t0 = time.perf_counter()
    builder.build(0, 0)  # sampler set-up, first touches
    first = time.perf_counter() - t0
    tokens = 0
    faults0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    for step in range(1, batches + 1):
        tokens += builder.build(step, step).n_tokens
    seconds = time.perf_counter() - t0
    faults = resource.getrusage(resource.RUSAGE_SELF)
    after = proc_status_mb()
    return {
        "startup_s": startup,
        "first_batch_s": first,
        "samples_per_s": batches * PER_RANK / seconds,
        "tokens_per_s": tokens / seconds,
        "peak_mb": after["VmHWM"],
        "rss_anon_mb": after["RssAnon"],
        "rss_file_mb": after["RssFile"],
        "imports_mb": imports["VmRSS"],
        "opened_mb": opened["VmRSS"],
        "minor_faults_per_sample": (faults.ru_minflt - faults0.ru_minflt) / (batches * PER_RANK),
        "major_faults_per_sample": (faults.ru_majflt - faults0.ru_majflt) / (batches * PER_RANK),
    }


# --- sizing ------------------------------------------------------------------------------


def _mem_available_mb() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    return math.inf


def in_memory_estimate_mb(n: int) -> float:
    """What the in-memory loader holds at its peak: about 1.5 times the records' bytes
    (measured at 10^6), taken twice for a margin, and the imports."""
    mean_len = math.exp(LENGTH_MU + LENGTH_SIGMA**2 / 2)
    return 2 * n * (mean_len + 64) / 2**20 + 500


def disk_estimate_bytes(n: int) -> float:
    """Shards (zstd), store (uncompressed) and the build's temporary files."""
    mean_len = math.exp(LENGTH_MU + LENGTH_SIGMA**2 / 2)
    return n * (2.0 * mean_len + 300)


def sizes_from_env(quick: bool) -> tuple[int, ...]:
    return synthetic_sizes("ESM3_BENCH_STORE_SIZES", QUICK_SIZES if quick else FULL_SIZES)


# --- rows and table ----------------------------------------------------------------------


def _row(name: str, metric: str, value: float, unit: str, **kw: Any) -> dict[str, Any]:
    baseline, ratio = kw.pop("baseline", None), kw.pop("ratio", None)
    return bench_row(SUITE, name, metric, value, unit, baseline=baseline, ratio=ratio, params=kw)


def size_rows(n: int, data: Synthetic, build: dict, loaders: dict[str, dict]) -> list[dict]:
    """The rows of one size: build, each loader, store / in-memory ratios."""
    p = dict(records=n, residues=data.residues, centers=data.centers, shards=len(data.shards),
             per_rank=PER_RANK, context=CONTEXT, threads=1)  # fmt: skip
    rows = [
        _row(f"build_{n}", "records_per_s", n / build["seconds"], "records/s",
             seconds=build["seconds"], store_mb=round(build["store_mb"], 1),
             memory_limit=BUILD_MEMORY, **p),
        _row(f"build_{n}", "peak_rss", build["peak_mb"], "MB",
             imports_mb=round(build["imports_mb"], 1), **p),
    ]  # fmt: skip
    base = loaders.get("in_memory")
    for kind, r in loaders.items():
        q = dict(p, loader=kind, first_batch_s=round(r["first_batch_s"], 3),
                 imports_mb=round(r["imports_mb"], 1),
                 opened_mb=round(r["opened_mb"], 1),
                 minor_faults_per_sample=round(r["minor_faults_per_sample"], 2),
                 major_faults_per_sample=round(r["major_faults_per_sample"], 3))  # fmt: skip
        for metric, key, unit in (
            ("startup_s", "startup_s", "s"),
            ("peak_rss", "peak_mb", "MB"),
            ("rss_anon", "rss_anon_mb", "MB"),
            ("rss_file", "rss_file_mb", "MB"),
            ("samples_per_s_core", "samples_per_s", "samples/s"),
        ):
            vs = base[key] if base is not None and kind != "in_memory" else None
            rows.append(_row(f"loader_{kind}_{n}", metric, r[key], unit, baseline=vs,
                             **q, **({"ratio_of": "store / in_memory"} if vs else {})))  # fmt: skip
    return rows


def flatness_rows(results: dict[int, dict]) -> list[dict]:
    """Peak RSS at the largest size / at the smallest, store loader and build."""
    sizes = sorted(n for n in results if "build" in results[n])
    if len(sizes) < 2:
        return []
    lo, hi = sizes[0], sizes[-1]
    rows = []
    for name, get in (
        ("loader_store", lambda r: r["loaders"]["store"]["peak_mb"]),
        ("loader_store_anon", lambda r: r["loaders"]["store"]["rss_anon_mb"]),
        ("build", lambda r: r["build"]["peak_mb"]),
    ):
        a, b = get(results[lo]), get(results[hi])
        rows.append(_row(f"{name}_flatness", f"peak_rss_{hi}", b, "MB", baseline=a,
                         note=f"ratio = size {hi} / size {lo}; aim <= 1.2",
                         small=lo, large=hi))  # fmt: skip
    return rows


def _cell(r: dict | None, key: str, fmt: str) -> str:
    return "-" if r is None else format(r[key], fmt)


def print_table(results: dict[int, dict]) -> None:
    """Size x loader: start-up, peak RSS, RssAnon, RssFile, samples/s/core; and the build."""
    head = (f"{'records':>10} {'loader':<10} {'start-up s':>10} {'peak RSS MB':>11} "
            f"{'RssAnon MB':>10} {'RssFile MB':>10} {'samples/s/core':>14} | {'build rec/s':>11} "
            f"{'build peak MB':>13}")  # fmt: skip
    print(head)
    print("-" * len(head))
    for n in sorted(results):
        res = results[n]
        if "skipped" in res:
            print(f"{n:>10} skipped: {res['skipped']}")
            continue
        b = res["build"]
        for i, kind in enumerate(("store", "in_memory")):
            r = res["loaders"].get(kind)
            build = (f"{n / b['seconds']:>11,.0f} {b['peak_mb']:>13,.0f}" if i == 0
                     else f"{'':>11} {'':>13}")  # fmt: skip
            print(f"{n:>10} {kind:<10} {_cell(r, 'startup_s', '>10.3f')} "
                  f"{_cell(r, 'peak_mb', '>11,.0f')} {_cell(r, 'rss_anon_mb', '>10,.0f')} "
                  f"{_cell(r, 'rss_file_mb', '>10,.0f')} {_cell(r, 'samples_per_s', '>14,.0f')} "
                  f"| {build}")  # fmt: skip
        if res["in_memory_skipped"]:
            print(f"{'':>10} in_memory skipped: {res['in_memory_skipped']}")
    print_ratios(results)


def print_ratios(results: dict[int, dict]) -> None:
    for n in sorted(results):
        lo = results[n].get("loaders", {})
        if "store" in lo and "in_memory" in lo:
            s, m = lo["store"], lo["in_memory"]
            print(f"store / in-memory at {n}: start-up {s['startup_s'] / m['startup_s']:.3f}, "
                  f"peak RSS {s['peak_mb'] / m['peak_mb']:.2f}, RssAnon "
                  f"{s['rss_anon_mb'] / m['rss_anon_mb']:.2f}, samples/s "
                  f"{s['samples_per_s'] / m['samples_per_s']:.2f}")  # fmt: skip
    for r in flatness_rows(results):
        print(f"{r['name']}: peak RSS at {r['params']['large']} / at {r['params']['small']} "
              f"= {r['ratio']:.2f}")  # fmt: skip


# --- the suite ---------------------------------------------------------------------------


def bench_size(n: int, scratch: Path, batches: int) -> dict[str, Any]:
    """Generate, build, load (both ways) at one size; the size's files removed after."""
    free = shutil.disk_usage(scratch).free
    if free < 1.5 * disk_estimate_bytes(n):
        return {"skipped": f"needs ~{disk_estimate_bytes(n) / 1e9:.1f} GB of disk, "
                           f"{free / 1e9:.1f} GB free in {scratch}"}  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix=f"bench_store_{n}_", dir=scratch))
    try:
        data = write_synthetic(work / "data", n)
        root = str(work / "root")
        build = in_child(build_child, data, root)
        loaders = {"store": in_child(loader_child, "store", data, root, batches)}
        need, cap = in_memory_estimate_mb(n), 0.5 * _mem_available_mb()
        if need <= cap:
            loaders["in_memory"] = in_child(loader_child, "in_memory", data, root, batches)
        return {"data": data, "build": build, "loaders": loaders,
                "in_memory_skipped": None if need <= cap else
                f"estimated {need:,.0f} MB > half the available memory ({cap:,.0f} MB)"}  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(quick: bool = False) -> list[dict[str, Any]]:
    """Rows of the `benchmarks` table; quick=True (sizes 2,000 and 20,000) takes seconds."""
    return run_sizes(sizes_from_env(quick), scratch_from_env(), QUICK_BATCHES if quick else BATCHES)


def run_sizes(sizes: tuple[int, ...], scratch: Path, batches: int) -> list[dict[str, Any]]:
    results: dict[int, dict] = {}
    rows: list[dict[str, Any]] = []
    for n in sizes:
        print(f"   store bench: {n:,} records", flush=True)
        res = results[n] = bench_size(n, scratch, batches)
        if "skipped" in res:
            rows.append(_row(f"size_{n}", "skipped", 0.0, "", reason=res["skipped"]))
            continue
        rows += size_rows(n, res["data"], res["build"], res["loaders"])
        if res["in_memory_skipped"]:
            rows.append(_row(f"loader_in_memory_{n}", "skipped", 0.0, "",
                             reason=res["in_memory_skipped"]))  # fmt: skip
        print(f"   ({n:,} records: data {res['data'].seconds:.1f}s, "
              f"{asdict(res['data'])['centers']:,} clusters)", flush=True)  # fmt: skip
    rows += flatness_rows(results)
    print_table(results)
    return rows


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m jobs.bench.bench_store", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--quick", action="store_true", help="sizes 2,000 and 20,000, 10 batches")
    ap.add_argument("--sizes", help="comma-separated record counts, e.g. 1e5,1e6")
    ap.add_argument("--scratch", help="directory for the generated data (default: $TMPDIR)")
    ap.add_argument("--batches", type=int, help=f"batches per loader (default {BATCHES})")
    a = ap.parse_args(argv)
    sizes = tuple(int(float(s)) for s in a.sizes.split(",")) if a.sizes else sizes_from_env(a.quick)
    batches = a.batches or (QUICK_BATCHES if a.quick else BATCHES)
    run_sizes(sizes, Path(a.scratch) if a.scratch else scratch_from_env(), batches)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
