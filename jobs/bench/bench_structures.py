"""Benchmarks of the structure stages on real PDB/mmCIF files (MDAnalysisTests).

- The structures stage (parse + filter + SASA + SS8 + structure tokens) in one process,
  structures (files) per second, against a baseline run side by side on the same files:
  biotite's reader, `biotite.structure.sasa` summed per residue, and mkdssp called directly
  once per file. ratio = ours / baseline (1.0 = no overhead; like the baseline, the stage runs
  mkdssp once per file, with every chain moved into a cell of its own). Rows
  `share_<step>` give each step's fraction of the stage's time.
- protein2ipr ingest, lines per second, against a plain Python split loop that does no
  validation and writes nothing (ratio = ours / baseline).
- Structure-token assignment, residues per second.
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import json
import random
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from jobs.bench import bench_row

SUITE = "structures"
_FULL = [
    "mmcif/5PTI.cif.gz",
    "mmcif/1YJP.cif.gz",
    "mmcif/3PWP.cif.gz",
    "mmcif/1BD2.pdb.gz",
    "1a28.pdb.gz",
    "4E43.pdb",
    "1hvr.pdb",
]
_QUICK = ["mmcif/1YJP.cif.gz"]
_FASTA = Path("/usr/share/doc/mmseqs2/example-data/DB.fasta.gz")


def _data_dir() -> Path | None:
    spec = importlib.util.find_spec("MDAnalysisTests")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def _row(name: str, metric: str, value: float, unit: str, baseline=None, params=None) -> dict:
    return bench_row(SUITE, name, metric, value, unit, baseline=baseline, params=params)


def baseline_structures(files: list[Path], tmp: Path) -> int:
    """biotite read + sasa per chain + mkdssp once per file, no checks; returns chains."""
    import biotite.structure as bs
    import biotite.structure.io.pdb as pdb
    import biotite.structure.io.pdbx as pdbx

    chains = 0
    for f in files:
        raw = f.read_bytes()
        text = (gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw).decode()
        plain = tmp / f.name.removesuffix(".gz")
        plain.write_text(text)
        if ".cif" in f.name:
            atoms = pdbx.get_structure(pdbx.CIFFile.read(str(plain)), model=1)
        else:
            atoms = pdb.PDBFile.read(str(plain)).get_structure(model=1)
        atoms = atoms[bs.filter_amino_acids(atoms) & ~np.isin(atoms.element, ["H", "D"])]
        for ch in np.unique(atoms.chain_id):
            chain = atoms[atoms.chain_id == ch]
            bs.apply_residue_wise(chain, bs.sasa(chain), np.nansum)
            chains += 1
        subprocess.run(
            ["mkdssp", "--output-format", "dssp", str(plain), str(tmp / "out.dssp")],
            check=True,
            capture_output=True,
        )
    return chains


def predicted_singles(files: list[Path], out: Path, copies: int) -> list[Path]:
    """Single-chain predicted structures as AFDB ships them (PDB, pLDDT 90 in the B-factor
    column), `copies` files of each protein chain of `files`: the bulk of the real mix."""
    import biotite.structure.io.pdb as pdb

    from esm3.data.structures.io import read_structure

    made = []
    for f in files:
        for ch in read_structure(f).chains:
            atoms = ch.atoms.copy()
            atoms.b_factor = np.full(atoms.array_length(), 90.0, dtype=np.float32)
            for k in range(copies):
                path = out / f"AF-{f.name.split('.')[0]}{ch.chain_id}{k}-F1-model_v4.pdb"
                pf = pdb.PDBFile()
                pf.set_structure(atoms)
                text = io.StringIO()
                pf.write(text)
                # AFDB's files open with a HEADER line (mkdssp reads it to know the format)
                header = f"{'HEADER':<10}{'PREDICTED PROTEIN':<40}{'01-JUL-22':<9}   XXXX\n"
                path.write_text(header + text.getvalue())
                made.append(path)
    return made


def _timed_stage(groups, tok) -> tuple[float, dict, dict]:  # type: ignore[no-untyped-def]
    """The stage over each (files, config) group, summed: seconds, counts, step times."""
    from esm3.data.structures.stages import StepTimes, process_structure_shard

    times = StepTimes()
    total, counts = 0.0, {"chains_kept": 0, "residues": 0}
    with tempfile.TemporaryDirectory() as d:
        for k, (files, cfg) in enumerate(groups):
            t0 = time.perf_counter()
            summary, rejects = process_structure_shard(
                files, Path(d) / f"s{k}.parquet", cfg, tokenizer=tok, times=times
            )
            total += time.perf_counter() - t0
            if rejects:
                raise RuntimeError(f"benchmark files were rejected: {rejects[:3]}")
            for key in counts:
                counts[key] += summary[key]
    return total, counts, times.as_dict()


def _bench_mix(files: list[Path], tok, quick: bool) -> list[dict]:  # type: ignore[no-untyped-def]
    """The stage on a mix like the real one: mostly single-chain predicted structures
    (AFDB filters, SASA and SS8 per Table S5), some multi-chain PDB entries, against the
    baseline on the same files."""
    from esm3.data.structures.filters import AFDBFilter, PDBFilter
    from esm3.data.structures.stages import StructureStageConfig

    with tempfile.TemporaryDirectory() as d:
        singles = predicted_singles(files, Path(d), 1 if quick else 3)
        afdb = StructureStageConfig("afdb", afdb=AFDBFilter(0.0, 0.0), sasa=True, ss8=True)
        pdb = StructureStageConfig("pdb", PDBFilter(one_chain_per_entity=False), sasa=True,
                                   ss8=True)  # fmt: skip
        ours, counts, _ = _timed_stage([(singles, afdb), (files, pdb)], tok)
        t0 = time.perf_counter()
        base_chains = baseline_structures(singles + files, Path(d))
        base = time.perf_counter() - t0
    n = len(singles) + len(files)
    params = {"predicted_single_chain": len(singles), "pdb_entries": len(files),
              "chains": counts["chains_kept"], "baseline_chains": base_chains}  # fmt: skip
    return [_row("structure_stage_mix", "structures_per_s_per_core", n / ours, "1/s", n / base,
                 params)]  # fmt: skip


def _bench_pipeline(files: list[Path], quick: bool) -> list[dict]:
    from esm3.data.structures.filters import PDBFilter
    from esm3.data.structures.io import read_structure
    from esm3.data.structures.stages import (
        StepTimes,
        StructureStageConfig,
        process_structure_shard,
    )
    from esm3.tokenize.structure import KMeansStructureTokenizer

    train = [c.backbone for f in files for c in read_structure(f).chains]
    tok = KMeansStructureTokenizer(4 if quick else 256, iterations=5).fit(train)
    # every chain, as the baseline does
    cfg = StructureStageConfig("pdb", PDBFilter(one_chain_per_entity=False), sasa=True, ss8=True)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        # warm both sides (biotite's CCD and radius caches, mkdssp's dictionary in the page
        # cache) so that neither pays one-time costs inside its timing
        process_structure_shard(files[:1], tmp / "warm.parquet", cfg, tokenizer=tok)
        baseline_structures(files[:1], tmp)
        times = StepTimes()
        t0 = time.perf_counter()
        summary, rejects = process_structure_shard(
            files, tmp / "s.parquet", cfg, tokenizer=tok, times=times
        )
        ours = time.perf_counter() - t0
        t0 = time.perf_counter()
        base_chains = baseline_structures(files, tmp)
        base = time.perf_counter() - t0
    if rejects:
        raise RuntimeError(f"benchmark files were rejected: {rejects}")
    n = len(files)
    params = {
        "files": [f.name for f in files],
        "chains": summary["chains_kept"],
        "baseline_chains": base_chains,
        "residues": summary["residues"],
    }
    rows = [
        _row("structure_stage", "structures_per_s_per_core", n / ours, "1/s", n / base, params),
        _row(
            "structure_stage",
            "chains_per_s_per_core",
            summary["chains_kept"] / ours,
            "1/s",
            base_chains / base,
            params,
        ),
    ]
    spent = times.as_dict()
    total = sum(spent.values()) or 1.0
    for step, sec in spent.items():
        rows.append(_row("structure_stage", f"share_{step}", sec / total, "fraction", None, params))
    return rows + _bench_mix(files, tok, quick)


def _protein2ipr_file(path: Path, n_proteins: int) -> int:
    """A protein2ipr-format file for real UniProt accessions (mmseqs2's example set)."""
    rng = random.Random(0)
    accs = []
    with gzip.open(_FASTA, "rt") as f:
        for line in f:
            if line.startswith(">"):
                accs.append(line.split("|")[1] if "|" in line else line[1:].split()[0])
                if len(accs) >= n_proteins:
                    break
    lines = 0
    with gzip.open(path, "wt") as out:
        for acc in accs:
            for _ in range(rng.randint(1, 6)):
                s = rng.randint(1, 300)
                ipr = f"IPR{rng.randint(0, 60000):06d}"
                out.write(f"{acc}\t{ipr}\tsome domain name\tPF{rng.randint(0, 20000):05d}")
                out.write(f"\t{s}\t{s + rng.randint(10, 200)}\n")
                lines += 1
    return lines


def _bench_protein2ipr(quick: bool) -> list[dict]:
    from esm3.data.interpro import ingest_protein2ipr

    if not _FASTA.exists():
        return []
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "protein2ipr.dat.gz"
        lines = _protein2ipr_file(src, 500 if quick else 20000)
        t0 = time.perf_counter()
        ingest_protein2ipr(src, Path(d) / "o.parquet")
        ours = time.perf_counter() - t0
        t0 = time.perf_counter()
        with gzip.open(src, "rt") as f:
            for line in f:
                line.rstrip("\n").split("\t")
        base = time.perf_counter() - t0
    return [
        _row(
            "protein2ipr_ingest", "lines_per_s", lines / ours, "1/s", lines / base, {"lines": lines}
        )
    ]


def _bench_tokens(files: list[Path], quick: bool) -> list[dict]:
    from esm3.data.structures.io import read_structure
    from esm3.tokenize.structure import KMeansStructureTokenizer

    bbs = [c.backbone for f in files for c in read_structure(f).chains]
    k = 4 if quick else 4096
    residues = sum(len(b) for b in bbs)
    if residues < k:  # a 4096-code book needs more residues than the files hold
        rng = np.random.default_rng(0)
        tok = KMeansStructureTokenizer(k)
        tok.centroids = rng.normal(size=(k, _feature_dim()))
    else:
        tok = KMeansStructureTokenizer(k, iterations=3).fit(bbs)
    t0 = time.perf_counter()
    for b in bbs:
        tok.encode(b)
    dt = time.perf_counter() - t0
    return [
        _row(
            "structure_tokens",
            "residues_per_s",
            residues / dt,
            "1/s",
            None,
            {"codebook_size": k, "residues": residues},
        )
    ]


def _feature_dim() -> int:
    from esm3.tokenize.structure import FEATURE_DIM

    return FEATURE_DIM


def run(quick: bool = False) -> list[dict]:
    root = _data_dir()
    if root is None:
        return []
    files = [root / p for p in (_QUICK if quick else _FULL) if (root / p).exists()]
    rows = []
    rows += _bench_pipeline(files, quick)
    rows += _bench_protein2ipr(quick)
    rows += _bench_tokens(files, quick)
    return rows


if __name__ == "__main__":
    import sys

    for r in run(quick="--quick" in sys.argv):
        print(json.dumps(r))
