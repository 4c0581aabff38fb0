"""Benchmark of the protein2ipr ingest: the streaming reader against the per-line reader.

A synthetic protein2ipr.dat.gz of the real file's shape (10^7 lines, 2*10^5 with
quick=True): proteins in accession order, as in the real file (TrEMBL-like A0A0123456,
then Swiss-Prot-like P12345 accessions), 1-12 matches each, IPR0xxxxx ids with their names
(words and spaces, some with commas, quotes or brackets), member-database signatures (PF,
SM, cd, G3DSA, PS, PR, ...), 1 <= start < end. Written with gzip level 1 (the file's level changes
the compressed size, hardly the cost of reading it).

Both ingests (`ingest_protein2ipr`, and `ingest_protein2ipr_lines` as the baseline) run
side by side, each in a fresh child process pinned to one CPU (Arrow and DuckDB on one
thread), from the .gz to the sorted Parquet: lines/s per core (wall time; and per CPU
second, which on a shared machine is what an idle core would do), the ratio streaming /
per-line (higher is better), and each child's peak RSS (VmHWM). The two outputs' counts
must agree. Rows:

- `ingest`: the file as it comes, sorted by accession; the streaming ingest notices that
  and skips the DuckDB sort, the per-line ingest sorts it.
- `ingest_unsorted`: the same lines with proteins shuffled (within chunks of 10^5
  proteins): both sort (DuckDB, one thread).
- `read_stage`: the reading alone (sorted file; rows to a Parquet file as the temporary
  file, no sort).
"""

from __future__ import annotations

import gzip
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from jobs.bench import bench_row
from jobs.bench.bench_store import in_child, proc_status_mb

SUITE = "interpro"
FULL_LINES = 10**7
QUICK_LINES = 2 * 10**5
CHUNK_PROTEINS = 100_000  # proteins generated (and compressed) at a time
_WORDS = ("domain", "family", "protein", "superfamily", "binding", "kinase", "transporter",
          "ATP-binding", "C-terminal", "N-terminal", "zinc finger", "repeat", "subunit",
          "alpha/beta", "hydrolase", "reductase", "(DUF1234)", "'helix'", "like,")  # fmt: skip
_DATABASES = ("PF", "SM", "cd", "G3DSA:3.40.50.", "PS", "PR", "TIGR", "SSF", "PTHR", "NF")


def _names(n: int, rng: np.random.Generator) -> np.ndarray:
    """One name per IPR id: 2-6 words."""
    picks = rng.integers(len(_WORDS), size=(n, 6))
    sizes = rng.integers(2, 7, size=n)
    return np.array(
        [" ".join(_WORDS[w] for w in row[:k]) for row, k in zip(picks, sizes, strict=True)]
    )


def _accessions(first: int, n: int, swiss_from: int, shuffled: bool, rng) -> pa.Array:
    """The accessions of proteins first..first+n-1, in accession order (as in the file)
    unless `shuffled`: TrEMBL-like (A0A + 7 digits), then from protein `swiss_from` on
    Swiss-Prot-like ([OPQ] + 5 digits)."""
    i = np.arange(first, first + n)
    trembl = pc.binary_join_element_wise(
        "A0A", pc.utf8_lpad(pc.cast(pa.array(i), pa.string()), 7, "0"), ""
    )
    j = np.maximum(i - swiss_from, 0)
    letter = pa.array(np.array(["O", "P", "Q"])[np.minimum(j // 100_000, 2)])
    digits = pc.utf8_lpad(pc.cast(pa.array(j % 100_000), pa.string()), 5, "0")
    swiss = pc.binary_join_element_wise(letter, digits, "")
    acc = pc.if_else(pa.array(i >= swiss_from), swiss, trembl)
    return acc.take(rng.permutation(n)) if shuffled else acc


def _chunk(first: int, n_proteins: int, acc: pa.Array, names: np.ndarray, rng) -> bytes:
    """The lines (bytes, newline-terminated) of `n_proteins` proteins, accessions `acc`."""
    per = rng.integers(1, 13, size=n_proteins)  # 6.5 matches a protein on average
    acc = acc.take(np.repeat(np.arange(n_proteins), per))
    n = len(acc)
    ipr_num = rng.zipf(1.3, size=n) % len(names)
    ipr = pc.binary_join_element_wise(
        "IPR0", pc.utf8_lpad(pc.cast(pa.array(ipr_num), pa.string()), 5, "0"), ""
    )
    db = rng.integers(len(_DATABASES), size=n)
    sig = pc.binary_join_element_wise(
        pa.array(np.array(_DATABASES)[db]),
        pc.utf8_lpad(pc.cast(pa.array(rng.integers(1, 50_000, size=n)), pa.string()), 5, "0"),
        "",
    )
    start = rng.integers(1, 800, size=n)
    end = start + rng.integers(10, 400, size=n)
    fields = [acc, ipr, pa.array(names[ipr_num]), sig]
    fields += [pc.cast(pa.array(v), pa.string()) for v in (start, end)]
    lines = pc.binary_join_element_wise(*fields, "\t")
    lines = pc.binary_join_element_wise(lines, "", "\n")
    if isinstance(lines, pa.ChunkedArray):
        lines = lines.combine_chunks()
    _, offsets, values = lines.buffers()  # the values buffer: the lines, concatenated
    bounds = np.frombuffer(offsets, np.int32)[[lines.offset, lines.offset + len(lines)]]
    return values.to_pybytes()[bounds[0] : bounds[1]]


def write_protein2ipr(path: Path, n_lines: int, shuffled: bool = False, seed: int = 0) -> int:
    """A synthetic protein2ipr.dat.gz of `n_lines` lines, sorted by accession unless
    `shuffled` (proteins in random order within each chunk); the number written."""
    rng = np.random.default_rng(seed)
    names = _names(40_000, rng)
    swiss_from = int(0.9 * n_lines / 6.5)  # the last tenth of the proteins
    written, first = 0, 0
    with gzip.open(path, "wb", compresslevel=1) as f:
        while written < n_lines:
            acc = _accessions(first, CHUNK_PROTEINS, swiss_from, shuffled, rng)
            data = _chunk(first, CHUNK_PROTEINS, acc, names, rng)
            if written + data.count(b"\n") > n_lines:
                data = b"".join(data.splitlines(keepends=True)[: n_lines - written])
            f.write(data)
            written += data.count(b"\n")
            first += CHUNK_PROTEINS
    return written


# --- child processes: one core each ---------------------------------------------------


def _on_one_cpu(cpu: int, out: str) -> None:
    """Pin this process to `cpu`, one thread for Arrow and DuckDB, and warm both readers
    on a few lines (their first calls import modules: a fixed cost, not a per-line one)."""
    from esm3.data import duck, interpro

    os.sched_setaffinity(0, {cpu})
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    duck.configure(threads=1)
    warm = Path(f"{out}.warm")
    warm.write_text("P1\tIPR000001\ta b\tPF1\t1\t9\nP2\tIPR000001\ta b\tPF1\tx\t9\nP0\tshort\n")
    for n, ingest in enumerate((interpro.ingest_protein2ipr, interpro.ingest_protein2ipr_lines)):
        ingest(warm, Path(f"{out}.warm{n}.parquet"))
        Path(f"{out}.warm{n}.parquet").unlink()
    warm.unlink()


def _measured(fn) -> dict:
    """fn()'s counts, wall and CPU seconds, and this process's peak RSS after it."""
    wall, cpu = time.perf_counter(), time.process_time()
    counts = fn()
    return {"seconds": time.perf_counter() - wall, "cpu_seconds": time.process_time() - cpu,
            "summary": counts, "peak_mb": proc_status_mb()["VmHWM"]}  # fmt: skip


def _ingest_child(reader: str, src: str, out: str, cpu: int) -> dict:
    """The whole ingest (read, temporary file, sort unless sorted) by `reader`."""
    from esm3.data import interpro

    _on_one_cpu(cpu, out)
    ingest = {"streaming": interpro.ingest_protein2ipr,
              "per_line": interpro.ingest_protein2ipr_lines}[reader]  # fmt: skip
    return _measured(lambda: ingest(src, out).summary)


def _read_stage_child(reader: str, src: str, out: str, cpu: int) -> dict:
    """The reading alone: rows to a Parquet file as the ingest's temporary file, no sort."""
    import pyarrow.parquet as pq

    from esm3.data import interpro

    _on_one_cpu(cpu, out)

    def read() -> dict:
        with pq.ParquetWriter(out, interpro.IPR_SCHEMA, compression="zstd") as w:
            if reader == "streaming":
                return interpro._stream_protein2ipr(Path(src), w, None, 100_000,
                                                    interpro._P2I_BLOCK, 1_000_000)[0]  # fmt: skip
            return interpro._parse_lines(Path(src), w, interpro.IPR_SCHEMA,
                                         interpro.parse_protein2ipr_line, "interpro", None,
                                         1_000_000, 100_000)[0]  # fmt: skip

    return _measured(read)


def _side_by_side(child, name: str, src: Path, tmp: Path, cpu: int, **params) -> list[dict]:
    got = {r: in_child(child, r, str(src), str(tmp / f"{name}_{r}.parquet"), cpu)
           for r in ("per_line", "streaming")}  # fmt: skip
    new, old = got["streaming"], got["per_line"]
    if new["summary"] != old["summary"]:
        raise RuntimeError(f"{name}: counts differ: {new['summary']} vs {old['summary']}")
    lines = new["summary"]["lines"]
    params.update(lines=lines, cpus=1, seconds=new["seconds"], baseline_seconds=old["seconds"],
                  cpu_seconds=new["cpu_seconds"], baseline_cpu_seconds=old["cpu_seconds"])  # fmt: skip
    return [
        bench_row(SUITE, name, "lines_per_s_per_core", lines / new["seconds"], "lines/s",
                  baseline=lines / old["seconds"], params=params),
        bench_row(SUITE, name, "lines_per_cpu_s", lines / new["cpu_seconds"], "lines/s",
                  baseline=lines / old["cpu_seconds"],
                  params=dict(params, note="process CPU time: the figure of an idle core")),
        bench_row(SUITE, name, "peak_rss", new["peak_mb"], "MB", baseline=old["peak_mb"],
                  params=dict(params, note="child process VmHWM; ratio streaming / per-line")),
    ]  # fmt: skip


def run(quick: bool = False) -> list[dict]:
    """Rows of the `benchmarks` table; quick=True finishes in seconds."""
    tmp = Path(tempfile.mkdtemp(prefix="bench_interpro_"))
    try:
        cpu = max(os.sched_getaffinity(0))
        rows = []
        for shuffled in (False, True):
            src = tmp / f"protein2ipr{'_shuffled' if shuffled else ''}.dat.gz"
            n = write_protein2ipr(src, QUICK_LINES if quick else FULL_LINES, shuffled)
            params = dict(input=f"synthetic {src.name}", gzip_level=1, written_lines=n,
                          bytes=src.stat().st_size, sorted_input=not shuffled)  # fmt: skip
            name = "ingest_unsorted" if shuffled else "ingest"
            rows += _side_by_side(_ingest_child, name, src, tmp, cpu, **params)
            if not shuffled:
                rows += _side_by_side(_read_stage_child, "read_stage", src, tmp, cpu, **params)
            src.unlink()
        return rows
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    import sys

    for r in run(quick="--quick" in sys.argv):
        print(r)
