"""Training benchmarks: tokens/s on 1 vs 2 nodes (scaling efficiency), data-wait fraction,
checkpoint save and load time.

Quick mode (smoke-tested): the tiny model in this process (gloo, world size 1) on real
UniProt sequences for a few steps, plus a DCP save/load of its state. Full mode adds real
jobs on the local SLURM cluster, 1 node and 2 nodes x 1 task, for the tiny and the ~100M
(`bench_100m`) configs: scaling efficiency = tokens/s(2 nodes) / (2 x tokens/s(1 node)),
the two runs side by side in the same session.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

from jobs.bench import bench_row

SUITE = "train"


def _data(root: Path, n: int) -> Path:
    """The first `n` real UniProt sequences (<= 250 residues) of mmseqs2-examples as a shard."""
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq

    ids, seqs, cur = [], [], None
    with gzip.open("/usr/share/doc/mmseqs2/example-data/DB.fasta.gz", "rt") as f:
        for line in f:
            if line.startswith(">"):
                if cur and len("".join(cur[1])) <= 250:
                    ids.append(cur[0])
                    seqs.append("".join(cur[1]))
                if len(ids) >= n:
                    break
                cur = (line[1:].split()[0], [])
            elif cur:
                cur[1].append(line.strip())
    out = root / "seq" / "uniprot-00000.parquet"
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": ids, "dataset": ["uniprot"] * len(ids), "sequence": seqs}), out)
    return out


def _config(shards: Path, preset: str, steps: int, batch: int, workers: int) -> Any:
    from esm3.train.config import (
        CheckpointConfig,
        DataConfig,
        DatasetSpec,
        ModelSection,
        OptimConfig,
        StageConfig,
        TrainConfig,
    )

    return TrainConfig(
        name=f"bench-{preset}",
        model=ModelSection(preset=preset, context_length=256),
        data=DataConfig(
            datasets=[DatasetSpec(name="uniprot", type="sequence", shards=[str(shards)])],
            batch_size=batch,
            workers=workers,
        ),
        stages=[StageConfig(name="bench", steps=steps, context_length=256, tracks=["sequence"])],
        optim=OptimConfig(lr=1e-3, warmup_steps=1),
        checkpoint=CheckpointConfig(every=0, resume=False),
        update_ratio_every=0,
    )


def _row(name: str, metric: str, value: float, unit: str, **kw: Any) -> dict[str, Any]:
    baseline, ratio = kw.pop("baseline", None), kw.pop("ratio", None)
    return bench_row(SUITE, name, metric, value, unit, baseline=baseline, ratio=ratio, params=kw)


def bench_in_process(
    rows: list[dict[str, Any]], root: Path, shards: Path, steps: int, workers: int
) -> None:
    """Tiny model, one rank: tokens/s, data-wait fraction, checkpoint save/load seconds."""
    import torch.distributed as dist

    from esm3.train import checkpoint as ckpt
    from esm3.train.data import load_datasets
    from esm3.train.trainer import Sinks, build_model, train

    own = not dist.is_initialized()
    if own:
        dist.init_process_group("gloo", init_method=f"file://{root / 'pg'}", rank=0, world_size=1)
    try:
        cfg = _config(shards, "tiny", steps, 8, workers=workers)
        got: list[dict[str, Any]] = []
        train(
            cfg,
            load_datasets(cfg, "/"),
            run_id="bench",
            ckpt_dir=root / "ck",
            sinks=Sinks(got.append),
            max_steps=steps,
        )
        body = got[1:] or got  # the first step pays for start-up
        tok = sum(r["tokens"] for r in body)
        secs = sum(r["step_time_s"] for r in body)
        wait = sum(r["data_wait_s"] for r in body)
        p = dict(preset="tiny", steps=len(body), batch=8, world_size=1, workers=workers)
        rows.append(_row("tiny_1rank", "tokens_per_s", tok / secs, "tokens/s", **p))
        rows.append(_row("tiny_1rank", "data_wait_fraction", wait / secs, "fraction", **p))
        import torch

        model, n = build_model(cfg, torch.device("cpu"))
        t0 = time.perf_counter()
        ckpt.save(root / "ck2", 1, model, None, {"model": ckpt.fingerprint(cfg.model_config())})
        save_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        ckpt.load(ckpt.step_dir(root / "ck2", 1), model, None)
        load_s = time.perf_counter() - t0
        mb = sum(f.stat().st_size for f in ckpt.step_dir(root / "ck2", 1).iterdir()) / 2**20
        pc = dict(preset="tiny", params=n, size_mb=round(mb, 2))
        rows.append(_row("checkpoint_tiny", "save_s", save_s, "s", **pc))
        rows.append(_row("checkpoint_tiny", "load_s", load_s, "s", **pc))
    finally:
        if own:
            dist.destroy_process_group()


def bench_scaling(
    rows: list[dict[str, Any]], shards: Path, preset: str, steps: int, batch: int
) -> None:
    """1 node vs 2 nodes on the local SLURM cluster: tokens/s and scaling efficiency."""
    from esm3.metrics.catalog import query
    from jobs.clusters import load_profile
    from jobs.train.submit import run_training
    from jobs.workspace import prepare

    profile = load_profile("slurm-local")
    tps = {}
    for nodes in (1, 2):
        ws = prepare(Path(tempfile.mkdtemp(prefix=f"bench-train-{nodes}-")))
        cfg = _config(shards, preset, steps, batch, workers=1)
        run_id, _ = run_training(
            ws, profile, cfg, nodes=nodes, tasks_per_node=1, timeout_s=900, progress=False
        )
        df = query(ws, "SELECT * FROM train_steps WHERE run_id = ? AND step > 1", [run_id])
        tps[nodes] = df.tokens.sum() / df.step_time_s.sum()
        wait = df.data_wait_s.sum() / df.step_time_s.sum()
        p = dict(preset=preset, nodes=nodes, steps=len(df), batch=batch)
        rows.append(_row(f"{preset}_{nodes}node", "tokens_per_s", tps[nodes], "tokens/s", **p))
        rows.append(_row(f"{preset}_{nodes}node", "data_wait_fraction", wait, "fraction", **p))
    eff = tps[2] / (2 * tps[1])
    rows.append(
        _row(
            f"{preset}_scaling",
            "scaling_efficiency",
            eff,
            "fraction",
            baseline=tps[1],
            ratio=tps[2] / tps[1],
            preset=preset,
            batch=batch,
            note="same global batch",
        )
    )


def run(quick: bool = False) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shards = _data(root, 200 if quick else 2000)
        bench_in_process(rows, root, shards, 2 if quick else 20, 0 if quick else 1)
        if not quick and os.environ.get("ESM3_BENCH_NO_SLURM") != "1":
            from jobs import slurm_local

            try:
                slurm_local.require_running(slurm_local.conf_path())
            except Exception as e:  # noqa: BLE001 - no cluster: report and skip
                rows.append(_row("scaling", "skipped", 0.0, "", reason=str(e)))
                return rows
            bench_scaling(rows, shards, "tiny", 20, 8)
            bench_scaling(rows, shards, "bench_100m", 4, 4)
    return rows
