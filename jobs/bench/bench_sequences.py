"""Benchmarks of the sequence data stages: ingest, cluster expansion, two-level sampling.

Ingest is compared with a plain line-by-line Python reader that parses the same headers with
`re`, validates the same alphabet, drops the same duplicates and writes the same Parquet, run
side by side in this process (ratio = ours / baseline, higher is better). Peak memory of the
ingest is measured in a child process at 1x and 10x the input (ratio 10x / 1x, flat is ~1).
"""

from __future__ import annotations

import gzip
import io
import itertools
import multiprocessing as mp
import re
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from jobs.bench import bench_row

SUITE = "sequences"
REAL_FASTA = Path("/usr/share/doc/mmseqs2/example-data/DB.fasta.gz")
_VALID = set("ACDEFGHIKLMNPQRSTVWYXBUZO")
_UNIPROT = re.compile(
    r"^(?:sp|tr)\|([^|\s]+)\|(\S*)(?:\s+(.*?))??(?:\s+OS=(.*?))?"
    r"(?:\s+OX=(\d+))?(?:\s+[A-Z]{2}=.*)?$"
)


def baseline_ingest(path: Path, out: Path, dataset: str, batch: int = 50_000) -> int:
    """The plain reader: one Python iteration per line, per record parsing and checks."""
    from esm3.data.fasta import SEQUENCE_SCHEMA

    cols: dict[str, list] = {k: [] for k in SEQUENCE_SCHEMA.names}
    seen: set[str] = set()
    written = 0
    writer = pq.ParquetWriter(out, SEQUENCE_SCHEMA, compression="zstd")

    def flush() -> None:
        nonlocal cols
        if cols["id"]:
            writer.write_table(pa.Table.from_pydict(cols, schema=SEQUENCE_SCHEMA))
        cols = {k: [] for k in SEQUENCE_SCHEMA.names}

    def emit(header: str, parts: list[str], offset: int) -> None:
        nonlocal written
        seq = "".join(parts).upper()
        if seq.endswith("*"):
            seq = seq[:-1]
        m = _UNIPROT.match(header)
        if m:
            rid, name, desc, taxon, taxid = m.groups()
        else:
            rid, _, desc = header.partition(" ")
            name = taxon = taxid = None
        if not seq or not rid or not set(seq) <= _VALID or rid in seen:
            return
        seen.add(rid)
        for k, v in zip(
            SEQUENCE_SCHEMA.names,
            (rid, dataset, seq, len(seq), name, desc or None, taxon, taxid and int(taxid), offset),
            strict=True,
        ):
            cols[k].append(v)
        written += 1
        if len(cols["id"]) >= batch:
            flush()

    opener = gzip.open if path.suffix == ".gz" else open
    header, parts, offset, pos = None, [], 0, 0
    with opener(path, "rt") as f:
        for line in f:
            if line.startswith(">"):
                if header is not None:
                    emit(header, parts, offset)
                header, parts, offset = line[1:].rstrip(), [], pos
            else:
                parts.append(line.strip())
            pos += len(line)
    if header is not None:
        emit(header, parts, offset)
    flush()
    writer.close()
    return written


def _make_input(src: Path, dst: Path, copies: int, wrap: int | None) -> int:
    """`copies` renamed copies of the real FASTA (ids made unique), optionally wrapped."""
    text = gzip.open(src).read().decode()
    records = text.split("\n>")
    records[0] = records[0].lstrip(">")
    buf = io.StringIO()
    for c in range(copies):
        for rec in records:
            head, _, seq = rec.partition("\n")
            seq = seq.replace("\n", "")
            if wrap:
                seq = "\n".join(seq[i : i + wrap] for i in range(0, len(seq), wrap))
            head = head.replace("|", f"|c{c}_", 1) if c else head
            buf.write(f">{head}\n{seq}\n")
    data = buf.getvalue().encode()
    with gzip.open(dst, "wb", compresslevel=1) as f:
        f.write(data)
    return len(data)


def _peak_rss_child(path: str, out: str, queue) -> None:
    from esm3.data.fasta import ingest_fasta

    ingest_fasta(path, out, dataset="bench")
    queue.put(_own_peak_mb())


def _own_peak_mb() -> float:
    """This process's peak RSS. VmHWM, not ru_maxrss: ru_maxrss survives exec, so a child
    spawned from a large parent would report the parent's size."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _peak_rss_mb(path: Path, out: Path) -> float:
    """Peak resident memory (MB) of a fresh process that ingests `path`."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    p = ctx.Process(target=_peak_rss_child, args=(str(path), str(out), queue))
    p.start()
    peak = queue.get(timeout=600)
    p.join()
    return peak


def _row(name, metric, value, unit, baseline=None, ratio=None, **params) -> dict:
    return bench_row(
        SUITE, name, metric, value, unit, baseline=baseline, ratio=ratio, params=params
    )


def _timed(fn, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def bench_ingest(quick: bool, tmp: Path) -> list[dict]:
    """Ours vs the plain reader on the real sequences: gzip input, and plain input (what an
    array task reads after `split_fasta`); unwrapped lines and 60-column lines."""
    from esm3.data.fasta import ingest_fasta

    if not REAL_FASTA.exists():
        return []
    warm = tmp / "warm.fasta"
    warm.write_text(">sp|P1|A_B x OS=y\nMKV\n")
    ingest_fasta(warm, tmp / "warm.parquet", dataset="bench")  # imports, regex compilation
    rows = []
    outs = itertools.count()  # a fresh output each run: an existing shard would be skipped
    for wrap in (None, 60):
        gz = tmp / f"in_w{wrap}.fasta.gz"
        _make_input(REAL_FASTA, gz, 1, wrap)
        text = gzip.open(gz).read()
        if quick:  # a twentieth of the records keeps the smoke test short
            text = text[: text.find(b"\n>", len(text) // 20) + 1]
            gz.write_bytes(gzip.compress(text, compresslevel=1))
        plain = tmp / f"in_w{wrap}.fasta"
        plain.write_bytes(text)
        for src, kind in ((gz, "gzip"), (plain, "plain")):

            def ours(src=src):
                return ingest_fasta(src, tmp / f"o{next(outs)}.parquet", dataset="bench")

            def base(src=src):
                return baseline_ingest(src, tmp / "base.parquet", "bench")

            summary, _ = ingest_fasta(src, tmp / f"check_{kind}{wrap}.parquet", dataset="b")
            assert base() == summary["written"]
            reps = 1 if quick else 3
            t_ours, t_base = _timed(ours, reps), _timed(base, reps)
            params = dict(input="mmseqs2-examples DB.fasta.gz", compression=kind,
                          wrap=wrap or "none", records=summary["records"], bytes=len(text),
                          repeats=reps, timing="best of repeats")  # fmt: skip
            tag = f"ingest_{kind}_wrap{wrap or 0}"
            rows.append(_row(tag, "throughput", len(text) / t_ours / 1e6, "MB/s",
                             len(text) / t_base / 1e6, t_base / t_ours, **params))  # fmt: skip
            rows.append(_row(tag, "records_per_s", summary["records"] / t_ours, "seq/s",
                             summary["records"] / t_base, t_base / t_ours, **params))  # fmt: skip
    if not quick:
        mems = {}
        for copies in (1, 10):
            src = tmp / f"mem{copies}.fasta.gz"
            _make_input(REAL_FASTA, src, copies, 60)
            mems[copies] = _peak_rss_mb(src, tmp / f"mem{copies}.parquet")
        rows.append(_row("ingest_peak_memory", "peak_rss_10x", mems[10], "MB", mems[1],
                         mems[10] / mems[1], note="child process peak RSS; ratio 10x / 1x",
                         bytes_1x=11_575_830))  # fmt: skip
    return rows


def synthetic_clusters(n_rows: int, seed: int = 0) -> tuple[pa.Table, pa.Table]:
    """Two-level synthetic clustering over `n_rows` sequence ids (numpy, no Python loops).

    High level: clusters of mean size ~2; low level groups ~3 high clusters (plus strays).
    """
    import pyarrow.compute as pc

    rng = np.random.default_rng(seed)
    ids = pc.binary_join_element_wise("s", pc.cast(pa.array(np.arange(n_rows)), pa.string()), "")
    high_rep = np.maximum.accumulate(np.where(rng.random(n_rows) < 0.5, np.arange(n_rows), 0))
    low_rep = np.maximum.accumulate(np.where(rng.random(n_rows) < 0.17, np.arange(n_rows), 0))
    high = pa.table({"level": np.full(n_rows, 0.9), "representative": ids.take(high_rep),
                     "member": ids})  # fmt: skip
    low = pa.table({"level": np.full(n_rows, 0.7), "representative": ids.take(low_rep),
                    "member": ids})  # fmt: skip
    return low, high


def bench_expansion(quick: bool) -> list[dict]:
    from esm3.data.clusters import expand_clusters

    n = 200_000 if quick else 10_000_000
    low, high = synthetic_clusters(n)
    t = time.perf_counter()
    expanded, stats = expand_clusters(low, high, cap=20, seed=0)
    dt = time.perf_counter() - t
    return [
        _row(
            "expansion",
            "rows_per_s",
            2 * n / dt,
            "rows/s",
            rows=2 * n,
            expanded=expanded.num_rows,
            seconds=dt,
        )
    ]


def bench_sampler(quick: bool) -> list[dict]:
    from esm3.data.clusters import expand_clusters
    from esm3.data.sampler import ClusterIndex, TwoLevelSampler

    low, high = synthetic_clusters(100_000 if quick else 1_000_000, seed=1)
    expanded, _ = expand_clusters(low, high, cap=20, seed=0)
    index = ClusterIndex.from_table(expanded)
    sampler = TwoLevelSampler({"a": index, "b": index}, {"a": 0.7, "b": 0.3}, seed=0, rank=0)
    batch = 1 << 16
    steps = 20 if quick else 200
    sampler.sample(batch)
    t = time.perf_counter()
    for _ in range(steps):
        sampler.sample(batch)
    dt = time.perf_counter() - t
    return [
        _row(
            "sampler",
            "samples_per_s",
            steps * batch / dt,
            "samples/s",
            batch=batch,
            steps=steps,
            datasets=2,
            note="one process, one thread",
        )
    ]


def run(quick: bool = False) -> list[dict]:
    """Rows of the `benchmarks` table; quick=True finishes in a few seconds."""
    tmp = Path(tempfile.mkdtemp(prefix="bench_sequences_"))
    try:
        pa.set_cpu_count(1)  # per-core figures
        pa.set_io_thread_count(1)
        return bench_ingest(quick, tmp) + bench_expansion(quick) + bench_sampler(quick)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    import sys

    for r in run(quick="--quick" in sys.argv):
        print(r)
