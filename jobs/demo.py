"""`make demo`: the main job on the embedded default (local executor, DuckDB, real data).

For now: an array job computing per-shard statistics of the 20,000 real UniProt
sequences of Debian's mmseqs2-examples, then what `esm3 sql` shows of it.
"""

from __future__ import annotations

import gzip
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

DEMO_FASTA = Path("/usr/share/doc/mmseqs2/example-data/DB.fasta.gz")


@dataclass
class DemoConfig:
    fasta: str = str(DEMO_FASTA)
    shards: int = 4

    def validate(self) -> None:
        from jobs.config import ConfigError

        if self.shards < 1:
            raise ConfigError(f"config key 'shards': {self.shards} must be >= 1")


def shard_stats(fasta: str, shard: int, n_shards: int, out: str) -> dict[str, object]:
    """Statistics of every n_shards-th record starting at `shard` (one array task)."""
    lengths: list[int] = []
    comp: Counter[str] = Counter()
    seq: list[str] = []
    idx = -1

    def close() -> None:
        if idx >= 0 and idx % n_shards == shard:
            s = "".join(seq)
            lengths.append(len(s))
            comp.update(s)

    with gzip.open(fasta, "rt") as f:
        for line in f:
            if line.startswith(">"):
                close()
                idx += 1
                seq = []
            else:
                seq.append(line.strip())
        close()
    stats = {
        "shard": shard,
        "sequences": len(lengths),
        "residues": sum(lengths),
        "min_length": min(lengths, default=0),
        "max_length": max(lengths, default=0),
        "mean_length": sum(lengths) / max(len(lengths), 1),
        "composition": dict(sorted(comp.items())),
    }
    p = Path(out)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps(stats, indent=1))
    tmp.replace(p)
    return stats


def run_demo(a) -> int:  # type: ignore[no-untyped-def]
    """Submit the demo array on the chosen profile, wait, and show the records with SQL."""
    from esm3.metrics.catalog import query
    from jobs import launch, workspace
    from jobs.cli import _print_frame
    from jobs.clusters import check_ready, load_profile
    from jobs.config import load, to_dict
    from jobs.errors import UserError

    cfg = load(DemoConfig, a.config, a.overrides)
    fasta = Path(cfg.fasta)
    if not fasta.exists():
        hint = " (install Debian's mmseqs2-examples: make setup)" if fasta == DEMO_FASTA else ""
        raise UserError(f"input {fasta} does not exist{hint}")
    profile = load_profile(a.cluster)
    ws = workspace.prepare(a.workspace)
    check_ready(profile)  # before anything is recorded
    n = cfg.shards
    run_id = launch.start_run(
        ws, kind="demo", name="uniprot-shard-stats", profile=profile, config=to_dict(cfg)
    )
    out = workspace.run_dir(ws, run_id)
    items = [(str(fasta), i, n, str(out / f"shard-{i}.json")) for i in range(n)]
    print(f"run {run_id}: {n} array tasks on '{profile.name}' over {fasta}")
    sub = launch.submit_array(
        ws, profile, run_id=run_id, stage="shard-stats", fn=shard_stats, items=items
    )
    try:
        results = sub.wait()
    except BaseException:
        launch.finish_run(ws, run_id, "FAILED")
        raise
    launch.finish_run(ws, run_id, "COMPLETED")
    total = sum(r["sequences"] for r in results)
    residues = sum(r["residues"] for r in results)
    print(f"{total:,} sequences, {residues:,} residues, mean length {residues / total:.1f}\n")
    print(
        f"$ esm3 sql \"SELECT run_id, kind, status, cluster, nodes FROM runs WHERE run_id = '{run_id}'\""
    )
    _print_frame(
        query(
            ws, f"SELECT run_id, kind, status, cluster, nodes FROM runs WHERE run_id = '{run_id}'"
        ),
        "table",
    )
    q = (
        f"SELECT array_index, job_id, node, state, exit_code, "
        f"round(epoch(ended_at - started_at), 2) AS seconds FROM jobs WHERE run_id = '{run_id}' ORDER BY array_index"
    )
    print(f'\n$ esm3 sql "{q}"')
    _print_frame(query(ws, q), "table")
    return 0
