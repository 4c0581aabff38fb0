"""Synthetic UniRef-like data and child-process measurement, shared by the benchmarks that
run at scale (bench_store, bench_scale).

Sequences: lognormal lengths (median ~270, mean ~330 residues, clipped), residues drawn in
UniProtKB/Swiss-Prot proportions, built as Arrow arrays without a Python loop. Measurement:
a function run in a fresh (spawned) process, whose peak RSS is read from /proc.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue as queue_mod
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

CHILD_TIMEOUT_S = 3600

# UniProtKB/Swiss-Prot amino-acid composition, percent
AA_PERCENT = {
    "A": 8.25, "R": 5.53, "N": 4.06, "D": 5.45, "C": 1.37, "Q": 3.93, "E": 6.75,
    "G": 7.07, "H": 2.27, "I": 5.96, "L": 9.66, "K": 5.84, "M": 2.42, "F": 3.86,
    "P": 4.70, "S": 6.56, "T": 5.34, "W": 1.08, "Y": 2.92, "V": 6.87,
}  # fmt: skip
# lognormal lengths: median ~270, mean ~330 residues (UniRef-like), clipped
LENGTH_MU, LENGTH_SIGMA, LENGTH_MIN, LENGTH_MAX = 5.6, 0.65, 30, 4000

# the columns of an unpaired OAS unit, in OAS's order: AIRR rearrangement fields, then
# Redundancy and the ANARCI numbering and status
OAS_UNPAIRED_COLUMNS = (
    "sequence,locus,stop_codon,vj_in_frame,v_frameshift,productive,rev_comp,complete_vdj,"
    "v_call,d_call,j_call,sequence_alignment,germline_alignment,sequence_alignment_aa,"
    "germline_alignment_aa,v_alignment_start,v_alignment_end,d_alignment_start,"
    "d_alignment_end,j_alignment_start,j_alignment_end,v_sequence_alignment,"
    "v_sequence_alignment_aa,v_germline_alignment,v_germline_alignment_aa,"
    "d_sequence_alignment,d_sequence_alignment_aa,d_germline_alignment,"
    "d_germline_alignment_aa,j_sequence_alignment,j_sequence_alignment_aa,"
    "j_germline_alignment,j_germline_alignment_aa,fwr1,fwr1_aa,cdr1,cdr1_aa,fwr2,fwr2_aa,"
    "cdr2,cdr2_aa,fwr3,fwr3_aa,fwr4,fwr4_aa,cdr3,cdr3_aa,junction,junction_length,"
    "junction_aa,junction_aa_length,v_score,d_score,j_score,v_cigar,d_cigar,j_cigar,"
    "v_support,d_support,j_support,v_identity,d_identity,j_identity,v_sequence_start,"
    "v_sequence_end,v_germline_start,v_germline_end,d_sequence_start,d_sequence_end,"
    "d_germline_start,d_germline_end,j_sequence_start,j_sequence_end,j_germline_start,"
    "j_germline_end,fwr1_start,fwr1_end,cdr1_start,cdr1_end,fwr2_start,fwr2_end,cdr2_start,"
    "cdr2_end,fwr3_start,fwr3_end,fwr4_start,fwr4_end,cdr3_start,cdr3_end,np1,np1_length,"
    "np2,np2_length,c_region,Redundancy,ANARCI_numbering,ANARCI_status"
).split(",")


def residue_table() -> np.ndarray:
    """1,000 residue codes (uint8) in Swiss-Prot proportions: a uniform draw of an index
    into it is a residue of the real composition (to 0.1%)."""
    letters = np.frombuffer("".join(AA_PERCENT).encode(), dtype=np.uint8)
    counts = np.round(np.array(list(AA_PERCENT.values())) * 10).astype(int)
    counts[np.argmax(counts)] += 1000 - counts.sum()
    return np.repeat(letters, counts)


def draw_lengths(rng: np.random.Generator, n: int) -> np.ndarray:
    lengths = rng.lognormal(LENGTH_MU, LENGTH_SIGMA, n)
    return np.clip(np.rint(lengths), LENGTH_MIN, LENGTH_MAX).astype(np.int32)


def draw_sequences(rng: np.random.Generator, lengths: np.ndarray, table: np.ndarray) -> Any:
    """A pyarrow string array of random sequences of the given lengths (no Python loop)."""
    import pyarrow as pa

    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    codes = table[rng.integers(0, len(table), int(offsets[-1]), dtype=np.uint16)]
    return pa.StringArray.from_buffers(len(lengths), pa.py_buffer(offsets), pa.py_buffer(codes))


def record_ids(rows: np.ndarray, prefix: str = "SYN", width: int = 9) -> Any:
    """Ids `SYN000000042` (prefix, then the row zero-padded to `width` digits) of record
    rows, as a pyarrow string array."""
    import pyarrow as pa
    import pyarrow.compute as pc

    digits = pc.utf8_lpad(pc.cast(pa.array(rows), pa.string()), width=width, padding="0")
    return pc.binary_join_element_wise(prefix, digits, "")


# --- child processes ---------------------------------------------------------------------


def proc_status_mb() -> dict[str, float]:
    """This process's VmRSS, VmHWM, RssAnon and RssFile in MB (VmHWM rather than ru_maxrss:
    a spawned child's ru_maxrss may carry its parent's)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(rest.split()[0]) / 1024
    return out


def _children() -> dict[int, list[int]]:
    """ppid -> pids of the processes running now (from /proc)."""
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue  # gone meanwhile
            kids.setdefault(ppid, []).append(int(d))
    return kids


def _hwm_mb(pid: int, own_exe: str) -> float:
    """VmHWM of a tool process; 0 for a fork not yet exec'd (it shows its parent's pages)."""
    try:
        if os.readlink(f"/proc/{pid}/exe") == own_exe:
            return 0.0
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class ToolPeak:
    """The largest peak RSS (VmHWM) of one process among this process's descendants (the
    tools it runs: mmseqs, mkdssp), sampled every `interval` seconds by a thread while in
    the `with` block. Not RUSAGE_CHILDREN: a child forked from this process carries this
    process's peak into it. A lower bound: growth in a tool's last `interval` is not seen."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval, self.peak_mb = interval, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        me, exe = os.getpid(), os.readlink("/proc/self/exe")
        while not self._stop.wait(self.interval):
            kids = _children()
            todo = list(kids.get(me, ()))
            while todo:
                pid = todo.pop()
                self.peak_mb = max(self.peak_mb, _hwm_mb(pid, exe))
                todo += kids.get(pid, [])

    def __enter__(self) -> ToolPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _child_main(fn: Callable[..., dict], args: tuple, results: Any) -> None:
    try:
        results.put(fn(*args))
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises it
        results.put({"error": traceback.format_exc()})


def in_child(fn: Callable[..., dict], *args: Any) -> dict[str, Any]:
    """fn(*args) in a fresh (spawned) process; its result dict, or RuntimeError with the
    child's traceback or exit code (e.g. killed for memory)."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    p = ctx.Process(target=_child_main, args=(fn, args, results))
    p.start()
    deadline = time.monotonic() + CHILD_TIMEOUT_S
    try:
        while True:
            try:
                got = results.get(timeout=2)
                break
            except queue_mod.Empty:
                if not p.is_alive():
                    raise RuntimeError(f"{fn.__name__}: child exited {p.exitcode}") from None
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{fn.__name__}: no result in {CHILD_TIMEOUT_S}s") from None
    finally:
        p.join(timeout=30)
        if p.is_alive():
            p.kill()
    if "error" in got:
        raise RuntimeError(f"{fn.__name__} failed in the child:\n{got['error']}")
    return got


def scratch_from_env() -> Path:
    """Where benchmarks write their generated data: ESM3_BENCH_SCRATCH, else $TMPDIR."""
    return Path(os.environ.get("ESM3_BENCH_SCRATCH") or tempfile.gettempdir())


def sizes_from_env(var: str, default: tuple[int, ...]) -> tuple[int, ...]:
    """Comma-separated sizes from environment variable `var` ("1e5,1e6" is read too)."""
    raw = os.environ.get(var, "")
    return tuple(int(float(s)) for s in raw.split(",")) if raw else default
