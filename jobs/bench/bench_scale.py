"""`esm3 bench scale`: the scale rehearsal of the preprocessing stages.

Each case runs a stage's real task function (`jobs.stages`, as the pipeline's array tasks
run it: `InAllocation`, in an allocation of ALLOCATION_CPUS CPUs and ALLOCATION_MB of
memory) in a fresh child process at two sizes, on synthetic inputs shaped as the databases
publish them (`jobs.bench.scale_inputs`). Per size: wall seconds, time per record, the
child's peak RSS (VmHWM; the inputs are generated in this process, not the child) and the
largest peak RSS of one tool process it ran (mmseqs, mkdssp: `ToolPeak`, sampled). Per case: peak RSS
at the large size / at the small one; the aim is flat, ratio <= FLAT (1.25).

Cases (full sizes; --quick / quick=True uses ~1/100 of them):
- fasta_ingest:   UniRef90-like FASTA.gz, 10^5 and 10^6 records -> `ingest_task`
- mmseqs_cluster: the ingested shard of 10^5 and 10^6 records -> `cluster_task` at the
                  default levels (0.7, 0.9): linclust with the paper's flags
- purge:          a shard of 10^5 records against its validation set (25,000 records,
                  `validation_task`) -> `purge_task` (easy-search at the paper's
                  sensitivity, -s 7); one size, time per record
- oas_ingest:     one unpaired OAS data unit of 10^5 and 10^6 rows -> `ingest_task`
- esmatlas_lookup: ESMAtlas metadata of 10^6 and 10^7 rows, Parquet and CSV: the lookup
                  of one structure shard's ids (`read_esmatlas_metadata`, a DuckDB scan;
                  ESMATLAS_SHARD_IDS ids, the datasets' default shard size), s per shard.
                  Tasks read Parquet: the `list` stage turns a CSV table into Parquet
                  sorted by id once; the CSV row is what every task would pay without it
- interpro_ingest: protein2ipr.dat.gz of 10^6 and 10^7 lines -> `ingest_protein2ipr`
- structures:     an AFDB-style tar of 10^3 and 10^4 members (real structures from
                  MDAnalysisTests, repeated under distinct names) as one `ArchivePart`
                  -> `structure_task` (AFDB: filters, SASA, SS8 by mkdssp)
- site_dry_run:   `esm3 preprocess all --dry-run` of site-example.toml over listings of
                  10^5 and 2 x 10^8 AFDB files (`jobs.bench.scale_dryrun`): the submitting
                  process's seconds and peak RSS, the arrays and tasks of every stage

Reading the figures: a case's peak includes its imports (~90-450 MB, the `imports_mb`
param). DuckDB steps may grow up to the allocation's DuckDB limit (80% of ALLOCATION_MB)
before they spill, so a ratio above FLAT there is bounded by the limit, not by the data;
the rows' params say which task summary each figure belongs to. The purge at the paper's
sensitivity (three prefilter steps up to -s 7) takes tens of minutes at 10^5 on two cores.
The structures at 10^4 take ~17 minutes (~0.1 s a structure, mkdssp most of it): the
size is an option (below) for a shorter run.

Options (environment, as `make bench` passes none): ESM3_BENCH_SCALE_<CASE>=N1,N2 sets a
case's sizes (e.g. ESM3_BENCH_SCALE_STRUCTURES=1000,4000; "1e6" is read too),
ESM3_BENCH_SCALE_CASES=fasta_ingest,purge runs only those cases, ESM3_BENCH_SCRATCH=DIR is
where the data is written (each case's files are deleted after it).
`python -m jobs.bench.bench_scale --help` runs the suite alone.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs.bench import bench_row
from jobs.bench import scale_inputs as inputs
from jobs.bench.synthetic import (
    ToolPeak,
    in_child,
    proc_status_mb,
    scratch_from_env,
    sizes_from_env,
)

SUITE = "scale"
FLAT = 1.25  # aim: peak RSS at the large size / at the small one
ALLOCATION_CPUS, ALLOCATION_MB = 2, 2048  # one task's allocation (DuckDB gets 80%)
QUICK_DIVISOR = 100
VALIDATION = 25_000  # paper: validation records per dataset
ESMATLAS_SHARD_IDS = 100  # structure files per task (DatasetConfig.shard_size)
RUN_ID = "bench-scale"


# --- the child: one task, measured ---------------------------------------------------------


def run_task(task: Callable[..., Any], ws: str, *args: Any) -> dict[str, Any]:
    """task(ws, run_id, *args) as an array task runs it (`InAllocation`, in this benchmark's
    allocation); seconds, this process's peak RSS and its tools' largest peak RSS."""
    os.environ.update(ESM3_JOB_CPUS=str(ALLOCATION_CPUS), SLURM_MEM_PER_NODE=str(ALLOCATION_MB))
    from jobs.stages.runner import InAllocation

    before = proc_status_mb()
    t0 = time.perf_counter()
    with ToolPeak() as tools:
        summary = InAllocation(task)(ws, RUN_ID, *args)
    seconds = time.perf_counter() - t0
    return {
        "seconds": seconds,
        "peak_mb": proc_status_mb()["VmHWM"],
        "imports_mb": before["VmRSS"],
        "tool_peak_mb": tools.peak_mb,
        "summary": _plain(summary),
    }


def _plain(summary: Any) -> dict[str, Any]:
    """The task's summary counts (what pickles and prints)."""
    items = summary.items() if isinstance(summary, dict) else ()
    return {k: v for k, v in items if isinstance(v, (int, float, str, bool))}


def esmatlas_lookup_task(ws: str, run_id: str, table: str, ids: list[str]) -> dict:
    """The structure task's per-shard metadata lookup (process_structure_shard)."""
    from esm3.data.structures.filters import read_esmatlas_metadata

    return {"found": len(read_esmatlas_metadata(table, ids))}


def protein2ipr_task(ws: str, run_id: str, src: str, out: str) -> dict:
    from esm3.data.interpro import ingest_protein2ipr

    return dict(ingest_protein2ipr(src, out).summary)


# --- cases: the measurements of one size -----------------------------------------------------


def _ingest(fasta: Path, out: Path, ws: Path) -> dict:
    from jobs.stages.sequences import ingest_task

    return in_child(run_task, ingest_task, str(ws), str(fasta), str(out), "uniref90", "auto",
                    "upper")  # fmt: skip


def fasta_ingest(work: Path, n: int) -> dict[str, dict]:
    fasta = inputs.write_uniref_fasta(work / "uniref90.fasta.gz", n)
    return {"": _ingest(fasta, work / "shard.parquet", work)}


def mmseqs_cluster(work: Path, n: int) -> dict[str, dict]:
    from jobs.stages.sequences import cluster_task

    fasta = inputs.write_uniref_fasta(work / "uniref90.fasta.gz", n)
    _ingest(fasta, work / "shard.parquet", work)
    fasta.unlink()
    levels = [0.7, 0.9]
    outs = [str(work / f"clusters-{lv:g}.parquet") for lv in levels]
    return {"": in_child(run_task, cluster_task, str(work), [str(work / "shard.parquet")],
                         outs, levels)}  # fmt: skip


def purge(work: Path, n: int) -> dict[str, dict]:
    from esm3.data.purge import MIN_IDENTITY
    from jobs.stages.sequences import purge_task, validation_task

    fasta = inputs.write_uniref_fasta(work / "uniref90.fasta.gz", n)
    shard, valid = work / "shard.parquet", work / "validation.parquet"
    _ingest(fasta, shard, work)
    in_child(run_task, validation_task, str(work), [str(shard)], str(valid),
             min(VALIDATION, n // 4), 0)  # fmt: skip
    out, black = work / "purged.parquet", work / "blacklist.parquet"
    return {"": in_child(run_task, purge_task, str(work), str(shard), str(valid), str(out),
                         str(black), MIN_IDENTITY)}  # fmt: skip


def oas_ingest(work: Path, n: int) -> dict[str, dict]:
    from jobs.stages.sequences import ingest_task

    unit = inputs.write_oas_unit(work / "SRR9179275_1_Heavy_IGHG.csv.gz", n)
    return {"": in_child(run_task, ingest_task, str(work), str(unit), str(work / "oas.parquet"),
                         "oas", "auto", "upper", "oas")}  # fmt: skip


def esmatlas_lookup(work: Path, n: int) -> dict[str, dict]:
    import numpy as np

    rows = np.random.default_rng(0).choice(n, min(ESMATLAS_SHARD_IDS, n), replace=False)
    ids = inputs.esmatlas_ids(np.sort(rows)).to_pylist()
    got = {}
    for fmt in ("parquet", "csv"):
        table = inputs.write_esmatlas_metadata(work / f"metadata.{fmt}", n)
        got[fmt] = in_child(run_task, esmatlas_lookup_task, str(work), str(table), ids)
        table.unlink()
    return got


def interpro_ingest(work: Path, n: int) -> dict[str, dict]:
    src = inputs.write_protein2ipr(work / "protein2ipr.dat.gz", n)
    return {"": in_child(run_task, protein2ipr_task, str(work), str(src),
                         str(work / "protein2ipr.parquet"))}  # fmt: skip


def structures(work: Path, n: int) -> dict[str, dict]:
    from esm3.data.archives import ArchivePart
    from esm3.data.structures.stages import StructureStageConfig
    from jobs.stages.structures import derive_task, structure_task

    data = inputs.mda_data()
    if data is None:
        raise RuntimeError("MDAnalysisTests is not installed (make setup installs it)")
    sources = sorted({str(data / t) for t in inputs.STRUCTURE_TEMPLATES})
    derive_task(str(work), RUN_ID, sources, str(work / "derived"), None)  # AFDB-like PDB
    derived = {Path(s).name.split(".")[0]: work / "derived" / f"{Path(s).name.split('.')[0]}.pdb"
               for s in sources}  # fmt: skip
    templates = [derived[Path(t).name.split(".")[0]] for t in inputs.STRUCTURE_TEMPLATES]
    bundle = inputs.write_structure_bundle(work / "bundle.tar", n, templates)
    return {"": in_child(run_task, structure_task, str(work), [ArchivePart(str(bundle))],
                         str(work / "structures.parquet"), StructureStageConfig("afdb"),
                         None, None)}  # fmt: skip


def site_dry_run(work: Path, n: int) -> dict[str, dict]:
    """`esm3 preprocess all --dry-run` of site-example.toml over listings with `n` AFDB
    files (`jobs.bench.scale_dryrun`): the submitting process's seconds and peak RSS."""
    from jobs.bench.scale_dryrun import rehearse

    got = rehearse(n, scratch=str(work))
    summary = {"stages": got["stages"], "inventory_write_s": round(got["inventory_write_s"], 1)}
    return {"": {"seconds": got["seconds"], "peak_mb": got["peak_rss_mb"], "imports_mb": None,
                 "tool_peak_mb": None, "summary": summary}}  # fmt: skip


@dataclass(frozen=True)
class Case:
    name: str
    unit: str  # what is counted per size: records, rows, lines, shards' ids, structures
    full: tuple[int, ...]
    measure: Callable[[Path, int], dict[str, dict]]  # variant -> the child's measurement

    def sizes(self, quick: bool) -> tuple[int, ...]:
        default = tuple(max(10, n // QUICK_DIVISOR) for n in self.full) if quick else self.full
        return sizes_from_env(f"ESM3_BENCH_SCALE_{self.name.upper()}", default)


# the suite's cases, in the order they run; a new case is one more entry here
CASES = [
    Case("fasta_ingest", "records", (10**5, 10**6), fasta_ingest),
    Case("mmseqs_cluster", "records", (10**5, 10**6), mmseqs_cluster),
    Case("purge", "records", (10**5,), purge),
    Case("oas_ingest", "rows", (10**5, 10**6), oas_ingest),
    Case("esmatlas_lookup", "metadata rows", (10**6, 10**7), esmatlas_lookup),
    Case("interpro_ingest", "lines", (10**6, 10**7), interpro_ingest),
    Case("structures", "structures", (10**3, 10**4), structures),
    Case("site_dry_run", "AFDB files", (10**5, 2 * 10**8), site_dry_run),
]


# --- rows and table ------------------------------------------------------------------------


def _row(name: str, metric: str, value: float, unit: str, **kw: Any) -> dict[str, Any]:
    baseline = kw.pop("baseline", None)
    return bench_row(SUITE, name, metric, value, unit, baseline=baseline, params=kw)


def _per_record(case: Case, n: int, m: dict) -> tuple[str, float, str]:
    """(metric, value, unit): time per record, or per shard for the lookup, or the plan's
    seconds for the dry run."""
    if case.name == "esmatlas_lookup":
        return "s_per_shard", m["seconds"], "s"
    if case.name == "site_dry_run":
        return "plan_s", m["seconds"], "s"
    return "us_per_record", 1e6 * m["seconds"] / n, "us"


def size_rows(case: Case, n: int, variant: str, m: dict) -> list[dict[str, Any]]:
    label = f"{case.name}{'_' + variant if variant else ''}_{n}"
    p = dict(case=case.name, variant=variant, size=n, unit_of_size=case.unit,
             seconds=round(m["seconds"], 3),
             imports_mb=None if m["imports_mb"] is None else round(m["imports_mb"], 1),
             cpus=ALLOCATION_CPUS, memory_mb=ALLOCATION_MB, summary=m["summary"])  # fmt: skip
    metric, value, unit = _per_record(case, n, m)
    rows = [_row(label, "peak_rss", m["peak_mb"], "MB", **p), _row(label, metric, value, unit, **p)]
    if m["tool_peak_mb"]:
        rows.append(_row(label, "tool_peak_rss", m["tool_peak_mb"], "MB", **p))
    return rows


def flatness_rows(case: Case, results: dict[int, dict[str, dict]]) -> list[dict[str, Any]]:
    """Peak RSS at the largest size / at the smallest, per variant."""
    if len(results) < 2:
        return []
    lo, hi = min(results), max(results)
    rows = []
    for variant, small in results[lo].items():
        a, b = small["peak_mb"], results[hi][variant]["peak_mb"]
        label = f"{case.name}{'_' + variant if variant else ''}_flatness"
        rows.append(_row(label, f"peak_rss_{hi}", b, "MB", baseline=a, small=lo, large=hi,
                         flat=b / a <= FLAT, note=f"ratio = size {hi} / size {lo}; aim <= {FLAT}"))  # fmt: skip
    return rows


def print_table(measured: list[tuple[Case, dict[int, dict[str, dict]]]]) -> None:
    head = (f"{'case':<24} {'size':>11} {'seconds':>9} {'per record':>14} {'peak MB':>8} "
            f"{'tool MB':>8} {'ratio':>6}")  # fmt: skip
    print(head)
    print("-" * len(head))
    for case, results in measured:
        lo = min(results, default=0)
        for n in sorted(results):
            for variant, m in results[n].items():
                metric, value, unit = _per_record(case, n, m)
                ratio = m["peak_mb"] / results[lo][variant]["peak_mb"] if n != lo else None
                label = f"{case.name}{' ' + variant if variant else ''}"
                print(f"{label:<24} {n:>11,} {m['seconds']:>9.1f} {value:>11.3g} {unit:<2} "
                      f"{m['peak_mb']:>8,.0f} {m['tool_peak_mb'] or 0:>8,.0f} "
                      f"{'' if ratio is None else format(ratio, '.2f'):>6}")  # fmt: skip


# --- the suite -----------------------------------------------------------------------------


def run_case(case: Case, sizes: tuple[int, ...], scratch: Path) -> dict[int, dict[str, dict]]:
    """The case at each size, each size's data in a folder of its own, removed after it."""
    results = {}
    root = Path(tempfile.mkdtemp(prefix=f"bench_scale_{case.name}_", dir=scratch))
    try:
        for n in sizes:
            print(f"   scale bench: {case.name} at {n:,} {case.unit}", flush=True)
            work = root / str(n)
            work.mkdir()
            t0 = time.perf_counter()
            results[n] = case.measure(work, n)
            print(f"   ({case.name} at {n:,}: {time.perf_counter() - t0:.1f}s with the inputs)",
                  flush=True)  # fmt: skip
            shutil.rmtree(work, ignore_errors=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return results


def chosen_cases(names: list[str] | None = None) -> list[Case]:
    raw = names or [s for s in os.environ.get("ESM3_BENCH_SCALE_CASES", "").split(",") if s]
    known = {c.name: c for c in CASES}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ValueError(f"unknown scale case(s) {unknown} (available: {', '.join(known)})")
    return [known[n] for n in raw] if raw else list(CASES)


def run(quick: bool = False, cases: list[str] | None = None) -> list[dict[str, Any]]:
    """Rows of the `benchmarks` table; quick=True (1/100 of the sizes) takes about a minute."""
    scratch, rows, measured = scratch_from_env(), [], []
    for case in chosen_cases(cases):
        results = run_case(case, case.sizes(quick), scratch)
        for n, variants in results.items():
            for variant, m in variants.items():
                rows += size_rows(case, n, variant, m)
        rows += flatness_rows(case, results)
        measured.append((case, results))
    print_table(measured)
    return rows


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m jobs.bench.bench_scale", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--quick", action="store_true", help="1/100 of the sizes")
    ap.add_argument("--cases", help=f"comma-separated, of: {', '.join(c.name for c in CASES)}")
    ap.add_argument("--scratch", help="directory for the generated data (default: $TMPDIR)")
    a = ap.parse_args(argv)
    if a.scratch:
        os.environ["ESM3_BENCH_SCRATCH"] = a.scratch
    run(a.quick, a.cases.split(",") if a.cases else None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
