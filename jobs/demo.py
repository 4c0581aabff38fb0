"""`make demo`: the main job on the embedded default (local executor, DuckDB, real data).

`pipeline = "full"` (the default): every preprocessing pipeline on the demo config (the
20,000 real UniProt sequences of Debian's mmseqs2-examples and real PDB/mmCIF entries of
MDAnalysisTests), then a short training run of the tiny model on what it produced, then
what `esm3 sql` shows of it. `pipeline = "stats"`: a quick array of per-shard sequence
statistics (seconds), the platform's smallest real job.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

DEMO_FASTA = Path("/usr/share/doc/mmseqs2/example-data/DB.fasta.gz")


@dataclass
class DemoConfig:
    pipeline: Literal["full", "stats"] = "full"
    preprocess: str = "demo"  # a preprocessing config name or TOML path (full)
    train: str = "demo"  # a training config name or TOML path (full)
    fasta: str = str(DEMO_FASTA)  # stats
    shards: int = 4  # stats

    def validate(self) -> None:
        from jobs.config import ConfigError

        if self.shards < 1:
            raise ConfigError(f"config key 'shards': {self.shards} must be >= 1")


def shard_stats(fasta: str, shard: int, n_shards: int, out: str) -> dict[str, object]:
    """Statistics of every n_shards-th valid record starting at `shard` (one array task),
    read with the suite's streaming FASTA parser."""
    import numpy as np
    import pyarrow as pa

    from esm3.data.fasta import iter_blocks, parse_block

    lengths: list[int] = []
    comp: Counter[str] = Counter()
    seen = 0  # valid records before this block
    for offset, block in iter_blocks(fasta):
        batch = parse_block(block, offset, dataset="demo", source=fasta).batch
        mine = np.arange(seen, seen + batch.num_rows) % n_shards == shard
        seen += batch.num_rows
        seqs = batch.column("sequence").filter(pa.array(mine)).to_pylist()
        lengths += [len(q) for q in seqs]
        comp.update("".join(seqs))
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
    if cfg.pipeline == "full":
        return run_full_demo(a, cfg)
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
    q = "SELECT run_id, kind, status, cluster, nodes FROM runs WHERE run_id = ?"
    print(f'$ esm3 sql "{_shown(q, run_id)}"')
    _print_frame(query(ws, q, [run_id]), "table")
    q = (
        "SELECT array_index, job_id, node, state, exit_code, "
        "round(epoch(ended_at - started_at), 2) AS seconds FROM jobs WHERE run_id = ? ORDER BY array_index"
    )
    print(f'\n$ esm3 sql "{_shown(q, run_id)}"')
    _print_frame(query(ws, q, [run_id]), "table")
    return 0


def _shown(sql: str, run_id: str) -> str:
    """The query as a user would type it into `esm3 sql` (the suite itself binds run_id)."""
    return sql.replace("?", "'" + run_id.replace("'", "''") + "'")


def run_full_demo(a, cfg: DemoConfig) -> int:  # type: ignore[no-untyped-def]
    """Preprocess every demo dataset, train the tiny model on the result, show the SQL."""
    import time

    from esm3.metrics.catalog import query
    from jobs import preprocess, workspace
    from jobs.cli import _print_frame
    from jobs.clusters import check_ready, load_profile
    from jobs.train.submit import demo_train

    profile = load_profile(a.cluster)
    ws = workspace.prepare(a.workspace)
    check_ready(profile)
    t0 = time.monotonic()
    print(
        f"== 1/2 preprocessing ({cfg.preprocess}) on '{profile.name}', workspace {ws}", flush=True
    )
    print(preprocess.demo(ws, profile, cfg.preprocess), flush=True)
    print(f"\n== 2/2 training ({cfg.train}) on '{profile.name}'", flush=True)
    print(demo_train(ws, profile, cfg.train), flush=True)
    run_id = query(
        ws, "SELECT run_id FROM runs WHERE kind = 'train' ORDER BY submitted_at DESC LIMIT 1"
    ).run_id[0]
    q = (
        "SELECT stage, count(*) AS steps, round(first(loss_sequence ORDER BY step), 3) AS seq_first, "
        "round(last(loss_sequence ORDER BY step), 3) AS seq_last, "
        "round(first(loss_structure ORDER BY step) FILTER (WHERE loss_structure IS NOT NULL), 3) AS struct_first, "
        "round(last(loss_structure ORDER BY step) FILTER (WHERE loss_structure IS NOT NULL), 3) AS struct_last "
        "FROM train_steps WHERE run_id = ? GROUP BY stage ORDER BY min(step)"
    )
    print(f'\n$ esm3 sql "{_shown(q, run_id)}"')
    _print_frame(query(ws, q, [run_id]), "table")
    q = "SELECT run_id, kind, status, cluster, nodes, world_size, param_count FROM runs ORDER BY submitted_at"
    print(f'\n$ esm3 sql "{q}"')
    _print_frame(query(ws, q), "table")
    print(
        f"\ndemo done in {time.monotonic() - t0:.0f}s; browse it with `make dashboard` "
        f"(ESM3_WORKSPACE={ws})"
    )
    return 0
