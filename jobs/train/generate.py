"""Inverse folding generation: sequences generated for the structures of a config's
datasets, as an array job (one task per structure shard), for the 50/50 rule."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jobs import launch
from jobs.clusters import ClusterProfile, check_ready
from jobs.config import ConfigError
from jobs.train.config import data_root


def generate_shard(
    cfg: Any,
    checkpoint: str,
    shard: str,
    dataset: str,
    n: int,
    out: str,
    seed: int = 0,
    temperature: float = 1.0,
) -> dict[str, Any]:
    """One array task: `n` sequences per structure of one shard, from an inverse folding
    checkpoint, into the Parquet file `out` (id, dataset, sample, sequence). Idempotent."""
    import pyarrow.parquet as pq

    from esm3.data.shards import write_table
    from esm3.train.inverse_folding import generate_table, load_model

    if Path(out).exists():
        return {"shard": shard, "out": out, "skipped": True}
    model = load_model(cfg.model_config(), checkpoint, seed)
    records = pq.read_table(shard).to_pylist()
    table, no_coords = generate_table(
        model, records, dataset, n, cfg.tasks, seed=seed, temperature=temperature
    )
    write_table(table, out)
    return {"shard": shard, "out": out, "sequences": table.num_rows, "no_coords": no_coords}


def submit_generation(
    ws: Path,
    profile: ClusterProfile,
    cfg: Any,
    checkpoint: str,
    *,
    per_structure: dict[str, int] | None = None,
    out_dir: str = "inverse_folded",
    temperature: float = 1.0,
) -> tuple[str, launch.Submission]:
    """An array job, one task per structure shard of the config's datasets: generated
    sequences (5 per AFDB/ESMAtlas structure, 64 per PDB structure by default) under
    `<workspace>/data/<out_dir>/<dataset>/`, where the ESM3 configs' `inverse_folded` read."""
    from esm3.train.inverse_folding import DEFAULT_PER_STRUCTURE
    from esm3.train.stores import DataError, record_files

    counts = {**DEFAULT_PER_STRUCTURE, **(per_structure or {})}
    check_ready(profile)
    items = []
    for d in cfg.data.datasets:
        if d.type != "structure":
            continue
        try:
            shards, _ = record_files(d, data_root(ws))
        except DataError as e:
            raise ConfigError(str(e)) from e
        n = counts.get(d.name, counts.get("pdb", 64))
        for sh in shards:
            out = data_root(ws) / out_dir / d.name / f"{sh.stem}.parquet"
            items.append(
                (cfg, str(checkpoint), str(sh), d.name, n, str(out), cfg.seed, temperature)
            )
    if not items:
        raise ConfigError("no structure dataset in the config: nothing to generate")
    run_id = launch.start_run(
        ws,
        kind="preprocess",
        name="inverse-folding-generate",
        profile=profile,
        config={"checkpoint": str(checkpoint), "per_structure": counts, "shards": len(items)},
    )
    sub = launch.submit_array(
        ws, profile, run_id=run_id, stage="inverse_fold", fn=generate_shard, items=items
    )
    return run_id, sub
