"""`esm3 train`: the multi-node FSDP training job on submitit (SLURM or local).

    esm3 train --config jobs/configs/train/tiny.toml --cluster slurm-local data.batch_size=8

Everything the user can get wrong is checked before anything is recorded or submitted:
the config (keys, values, stages), the scheduler, the data (every dataset's shards and
cluster files exist and are readable), the batch against the world size, and any
checkpoint the run would start from (same model). Then one job of nodes x tasks per node
ranks runs `TrainJob`: a `submitit.helpers.Checkpointable` that records its lifecycle in
`jobs` (like `records.Task`) and trains (`esm3.train.trainer.train`). On the preemption /
time-limit signal (USR2) every rank finishes its step, the ranks save a checkpoint
together, record REQUEUED, and rank 0 requeues the job; the next attempt resumes from
the latest checkpoint. Rank 0 writes `train_steps` and `events` through the lake writer.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

import submitit

from esm3.metrics.lake import LakeWriter, compact, now, write_rows
from jobs import launch, records
from jobs import workspace as wsp
from jobs.clusters import ClusterProfile, Resources, check_ready, load_profile, make_executor
from jobs.config import ConfigError, apply_overrides, from_dict, read_toml
from jobs.errors import UserError

log = logging.getLogger("esm3.train")

CONFIG_DIR = Path(__file__).resolve().parent / "configs" / "train"
STAGE = "train"

EXAMPLES = """examples:
  esm3 train --config jobs/configs/train/tiny.toml --cluster local
  esm3 train --config jobs/configs/train/esm3_1.4b.toml --cluster site-example --dry-run
  esm3 train --config jobs/configs/train/tiny.toml -c slurm-local --nodes 2 optim.lr=1e-3
"""


# --- config ------------------------------------------------------------------------------


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Any:
    """The TrainConfig of a TOML file (default: tiny.toml) with key=value overrides."""
    from esm3.train.config import TrainConfig

    p = Path(path) if path else CONFIG_DIR / "tiny.toml"
    if not p.exists() and (CONFIG_DIR / f"{p}.toml").exists():
        p = CONFIG_DIR / f"{p}.toml"  # a config by name: tiny, esm3_1.4b, ...
    data = apply_overrides(read_toml(p), list(overrides or []))
    try:
        return from_dict(TrainConfig, data)
    except ConfigError:
        raise
    except ValueError as e:  # the components' own checks (model, tasks, train config)
        raise ConfigError(f"{p}: {e}") from e


def config_dict(obj: Any) -> Any:
    """A config as plain data (init fields only), what `runs.config` stores."""
    if is_dataclass(obj):
        return {f.name: config_dict(getattr(obj, f.name)) for f in fields(obj) if f.init}
    if isinstance(obj, (list, tuple)):
        return [config_dict(x) for x in obj]
    if isinstance(obj, dict):
        return {k: config_dict(v) for k, v in obj.items()}
    return obj


def data_root(ws: Path) -> Path:
    return Path(ws) / "data"


def ckpt_dir(ws: Path, run_id: str) -> Path:
    return wsp.run_dir(ws, run_id) / "checkpoints"


def check_inputs(
    cfg: Any,
    ws: Path,
    world_size: int,
    profile: ClusterProfile | None = None,
    tasks_per_node: int = 1,
) -> dict[str, Any]:
    """Everything checkable before submission; one-line ConfigError naming the problem.

    With a profile, a step must also fit the memory one rank gets there.
    Returns facts for the run record: param_count, per-dataset record counts.
    """
    from esm3.model.config import param_count
    from esm3.train import checkpoint as ckpt
    from esm3.train.config import TrainConfigError
    from esm3.train.data import DataError, load_datasets

    try:
        cfg.validate()
        cfg.check_world_size(world_size)
    except TrainConfigError as e:
        raise ConfigError(str(e)) from e
    if profile is not None:
        check_memory(cfg, profile, world_size, tasks_per_node)
    try:
        datasets = load_datasets(cfg, data_root(ws))
    except DataError as e:
        raise ConfigError(f"config key 'data.datasets': {e}") from e
    mcfg = cfg.model_config()
    if cfg.checkpoint.init_from:
        try:
            state = ckpt.read_state(cfg.checkpoint.init_from)
            ckpt.check_compatible(state, ckpt.fingerprint(mcfg), cfg.checkpoint.init_from)
        except ValueError as e:
            raise ConfigError(f"config key 'checkpoint.init_from': {e}") from e
    return {
        "param_count": param_count(mcfg),
        "records": {n: len(d) for n, d in datasets.items()},
    }


def _size(n: float) -> str:
    """Bytes as GiB, TiB or PiB, one decimal."""
    units = ("GiB", "TiB", "PiB")
    i = 0
    while i < len(units) - 1 and n >= 2 ** (40 + 10 * i):
        i += 1
    return f"{n / 2 ** (30 + 10 * i):,.1f} {units[i]}"


def check_memory(cfg: Any, profile: ClusterProfile, world_size: int, tasks_per_node: int) -> None:
    """Refuse a batch whose step cannot fit one rank's memory on this profile (a lower bound
    of the step against what the profile gives a rank; skipped where that is unknown)."""
    budget = profile.memory_per_rank(tasks_per_node)
    if budget is None:
        return
    avail, what = budget
    need = cfg.min_step_bytes(world_size)
    if need > avail:
        ctx = max(s.context_length for s in cfg.stages)
        raise ConfigError(
            f"config key 'data.batch_size': {cfg.data.batch_size} samples of up to {ctx} tokens "
            f"over {world_size} rank(s) need at least {_size(need)} per rank, more than the "
            f"{_size(avail)} a rank has on profile '{profile.name}' ({what}); lower data.batch_size or "
            "the context length, or use more ranks"
        )


# --- the job -----------------------------------------------------------------------------


class Requeue(records.Interrupted):
    """Raised inside the job after the preemption checkpoint: requeue this attempt."""


_STOP = {"signal": 0, "at": 0.0}


def _on_signal(signum: int, frame: Any) -> None:  # noqa: ARG001 - signal handler signature
    # only a flag: the training loop checks it at the next step boundary, where every rank
    # can take part in the checkpoint's collectives
    _STOP["signal"] = signum
    _STOP["at"] = time.time()


def stop_requested() -> bool:
    return bool(_STOP["signal"])


class TrainJob(records.Task, submitit.helpers.Checkpointable):
    """The training job of every rank: records RUNNING / COMPLETED / FAILED like
    `records.Task`, and REQUEUED for an attempt interrupted by preemption or time limit.

    `checkpoint()` (submitit's hook, called if submitit's own handler fires before ours is
    installed) resubmits the same job; progress comes from the checkpoints on disk.
    """

    def run(self, ident: dict[str, Any], args: tuple[Any, ...]) -> Any:
        return train_job(Path(self.workspace), self.run_id, args[0], attempt=ident["attempt"])

    def on_interrupted(self, ident: dict[str, Any]) -> None:
        _requeue_and_wait(ident["rank"], self.run_id)  # does not return on SLURM

    def on_sigterm(self) -> None:
        # SLURM's SIGTERM (scancel, a requeue, a downed node) stops training at the next
        # step boundary like USR2, but is recorded as the scheduler says (CANCELLED or
        # REQUEUED) and not requeued again by us; DataLoader workers ignore it
        _on_signal(signal.SIGTERM, None)

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


def _requeue_and_wait(rank: int, run_id: str) -> None:
    """Rank 0 asks the scheduler to requeue the job; every rank then waits to be stopped."""
    env = submitit.JobEnvironment()
    if rank == 0:
        attempt = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
        log.warning("run %s: requeueing job %s (attempt %d)", run_id, env.job_id, attempt)
        env._requeue(max(0, 100 - attempt))  # submitit's requeue (scontrol requeue on SLURM)
    # SLURM stops this attempt's processes; a scheduler that does not gets us out here
    deadline = time.time() + 300
    while time.time() < deadline:
        time.sleep(1.0)
    sys.exit(3)


def train_job(ws: Path, run_id: str, cfg: Any, *, attempt: int = 0) -> dict[str, Any]:
    """What every rank runs inside the job: set-up, training, records. Returns a summary."""
    import torch
    import torch.distributed as dist

    from esm3.train.data import load_datasets
    from esm3.train.trainer import Sinks, train
    from jobs.distributed import init_from_submitit

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    signal.signal(signal.SIGUSR2, _on_signal)
    info = init_from_submitit()
    device = torch.device("cpu")
    if info.backend == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    rank0 = info.rank == 0
    steps_w = LakeWriter(ws, "train_steps", flush_seconds=5.0) if rank0 else None
    events_w = LakeWriter(ws, "events", flush_seconds=2.0) if rank0 else None

    def flush() -> None:  # before a checkpoint is declared: its steps and "saved" event
        for w in (steps_w, events_w):
            if w is not None:
                w.flush()

    sinks = Sinks(
        step=steps_w.add if steps_w else (lambda r: None),
        event=events_w.add if events_w else (lambda r: None),
        flush=flush,
    )
    if rank0:
        changes: dict[str, Any] = dict(status="RUNNING", world_size=info.world_size)
        if attempt == 0:
            changes["started_at"] = now()
        records.update_run(ws, run_id, **changes)
        if attempt:
            sinks.event(
                dict(
                    run_id=run_id,
                    step=None,
                    kind="requeue",
                    severity="warning",
                    message=f"attempt {attempt} started (SLURM_RESTART_COUNT)",
                    value=float(attempt),
                    time=now(),
                )
            )
    try:
        datasets = load_datasets(cfg, data_root(ws))
        res = train(
            cfg,
            datasets,
            run_id=run_id,
            ckpt_dir=ckpt_dir(ws, run_id),
            device=device,
            sinks=sinks,
            should_stop=stop_requested,
            attempt=attempt,
        )
    finally:
        for w in (steps_w, events_w):
            if w is not None:
                w.close()
        if rank0:  # one file per attempt instead of one per flush: fast reads for the dashboard
            for table in ("train_steps", "events"):
                compact(ws, table, run_id=run_id, min_files=2)
    summary = {
        "rank": info.rank,
        "world_size": info.world_size,
        "status": res.status,
        "step": res.step,
        "param_count": res.param_count,
        "losses": res.losses,
        "resumed_from": res.resumed_from,
        "node": os.environ.get("SLURMD_NODENAME"),
    }
    if res.status == "preempted":
        dist.barrier()
        raise Requeue(f"preempted at step {res.step}: checkpoint {res.checkpoint}")
    dist.barrier()
    dist.destroy_process_group()
    if rank0:
        launch.finish_run(ws, run_id, "COMPLETED")
    return summary


# --- submission --------------------------------------------------------------------------


def _resources(profile: ClusterProfile, nodes: int | None, tasks: int | None) -> Resources:
    """The job's nodes and tasks per node: the command line's, else the profile's."""
    for flag, v in (("--nodes", nodes), ("--tasks-per-node", tasks)):
        if v is not None and v < 1:
            raise ConfigError(f"{flag} must be >= 1, got {v}")
    res = Resources(nodes=nodes or profile.nodes, tasks_per_node=tasks or profile.tasks_per_node)
    if profile.executor == "local" and res.nodes != 1:
        raise ConfigError(f"profile '{profile.name}': {res.nodes} nodes requested, local runs one")
    return res


def submit(
    ws: Path,
    profile: ClusterProfile,
    cfg: Any,
    *,
    nodes: int | None = None,
    tasks_per_node: int | None = None,
    name: str | None = None,
    run_id: str | None = None,
) -> tuple[str, launch.Submission]:
    """Check everything, record the run, submit the job; returns (run_id, submission)."""
    res = _resources(profile, nodes, tasks_per_node)
    world = (res.nodes or 1) * (res.tasks_per_node or 1)
    check_ready(profile)
    facts = check_inputs(cfg, ws, world, profile, res.tasks_per_node or 1)
    cfg_json = config_dict(cfg)
    run_id = launch.start_run(
        ws,
        kind="train",
        name=name or cfg.name,
        profile=profile,
        config=cfg_json,
        nodes=res.nodes,
        world_size=world,
        param_count=facts["param_count"],
        run_id=run_id,
        stages=[STAGE],
    )
    folder = wsp.submitit_folder(ws, run_id)
    ex = make_executor(profile, folder, workspace=ws, job_name=STAGE, resources=res)
    job = TrainJob(str(ws), run_id, STAGE, profile.name, train_job)
    t0 = now()
    sjob = ex.submit(job, cfg)
    records.record_job(
        ws,
        run_id=run_id,
        stage=STAGE,
        job_id=str(sjob.job_id),
        attempt=0,
        rank=0,
        state="SUBMITTED",
        cluster=profile.name,
        submitted_at=t0,
        updated_at=t0,
    )
    if profile.executor == "slurm":
        launch.add_slurm_ids(ws, run_id, [str(sjob.job_id)])
    write_rows(
        ws,
        "events",
        [
            dict(
                run_id=run_id,
                step=0,
                kind="submit",
                severity="info",
                message=f"submitted job {sjob.job_id}: {res.nodes} node(s) x "
                f"{res.tasks_per_node} task(s), {facts['param_count']:,} parameters",
                value=float(world),
                detail=json.dumps(facts["records"]),
                time=t0,
            )
        ],
    )
    return run_id, launch.Submission(ws, run_id, STAGE, profile, [sjob])


def sbatch_script(ws: Path, profile: ClusterProfile, nodes: int | None, tasks: int | None) -> str:
    """The sbatch script `submit` would send (SLURM profiles), for --dry-run."""
    if profile.executor != "slurm":
        return f"(profile {profile.name!r} runs locally: no sbatch script)"
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "submitit"
        params = _resources(profile, nodes, tasks)
        try:
            ex = make_executor(profile, folder, workspace=ws, job_name=STAGE, resources=params)
        except ConfigError:
            # the scheduler is not reachable from here: build the script without asking it
            prof = ClusterProfile(**{**vars(profile), "slurm_conf": ""})
            ex = make_executor(prof, folder, workspace=ws, job_name=STAGE, resources=params)
        text = ex._make_submission_file_text(ex._submitit_command_str, "<uid>")
        return text.replace(str(folder), "<run>/submitit")


def run_training(
    ws: Path,
    profile: ClusterProfile,
    cfg: Any,
    *,
    nodes: int | None = None,
    tasks_per_node: int | None = None,
    wait: bool = True,
    timeout_s: float | None = None,
    progress: bool | None = None,
) -> tuple[str, list[Any]]:
    """Submit and (by default) wait; the run is FAILED in `runs` when the job fails."""
    run_id, sub = submit(ws, profile, cfg, nodes=nodes, tasks_per_node=tasks_per_node)
    if not wait:
        return run_id, []
    try:
        results = sub.wait(timeout_s=timeout_s, progress=progress)
    except (launch.JobFailed, TimeoutError) as e:
        launch.finish_run(ws, run_id, launch.run_status_after(e))
        raise
    return run_id, results


def demo_train(ws: Path, profile: ClusterProfile | str = "local", config: Any = None) -> str:
    """`make demo`'s training: the tiny model, a short real run on the demo data.

    config: a TrainConfig, a TOML path, or None (jobs/configs/train/demo.toml, which reads
    the demo preprocessing's shards). Returns a short printable summary.
    """
    from esm3.metrics.catalog import query

    prof = load_profile(profile) if isinstance(profile, str) else profile
    cfg = config if (config is not None and not isinstance(config, (str, Path))) else None
    if cfg is None:
        cfg = load_config(config or CONFIG_DIR / "demo.toml")
    t0 = time.time()
    run_id, results = run_training(Path(ws), prof, cfg, progress=False)
    df = query(
        ws,
        "SELECT step, loss, loss_sequence, tokens_per_s, data_wait_s FROM train_steps "
        "WHERE run_id = ? ORDER BY step",
        [run_id],
    )
    ev = query(
        ws, "SELECT kind, count(*) AS n FROM events WHERE run_id = ? GROUP BY kind", [run_id]
    )
    # the total loss grows when a stage turns more tracks on: follow the sequence track
    first, last = df.loss_sequence.iloc[0], df.loss_sequence.iloc[-1]
    per_rank = results[0] if isinstance(results[0], list) else [results[0]]
    return (
        f"training run {run_id}: {len(df)} steps of the {cfg.model.preset} model "
        f"({per_rank[0]['param_count']:,} parameters) on {prof.name} in {time.time() - t0:.0f}s; "
        f"sequence loss {first:.3f} -> {last:.3f}; {df.tokens_per_s.median():.0f} tokens/s; "
        f"data wait {df.data_wait_s.sum():.2f}s; events: "
        + ", ".join(f"{k} {n}" for k, n in zip(ev.kind, ev.n, strict=True))
    )


# --- inverse folding: generated sequences for the 50/50 rule ------------------------------


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
    import zlib

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from esm3.data.shards import write_table
    from esm3.model.esm3 import ESM3
    from esm3.tasks.sample import Protein
    from esm3.train import checkpoint as ckpt
    from esm3.train.inverse_folding import generate_sequences

    if Path(out).exists():
        return {"shard": shard, "out": out, "skipped": True}
    mcfg = cfg.model_config()
    state = ckpt.read_state(checkpoint)
    ckpt.check_compatible(state, ckpt.fingerprint(mcfg), checkpoint)
    torch.manual_seed(seed)
    model = ESM3(mcfg, device="cpu")
    ckpt.load(checkpoint, model, None)
    model.eval()
    from dataclasses import replace

    task = replace(cfg.tasks, max_length=mcfg.context_length)  # longer chains: a window
    rows = []
    table = pq.read_table(shard)
    skipped = 0
    for rec in table.to_pylist():
        if rec.get("coords") is None:
            skipped += 1
            continue
        p = Protein.from_record(rec)
        rng = np.random.default_rng([seed, zlib.crc32(p.id.encode())])
        for i, seq in enumerate(generate_sequences(model, p, n, rng, task, temperature)):
            rows.append({"id": p.id, "dataset": dataset, "sample": i, "sequence": seq})
    schema = pa.schema(
        [
            ("id", pa.string()),
            ("dataset", pa.string()),
            ("sample", pa.int32()),
            ("sequence", pa.string()),
        ]
    )
    write_table(pa.Table.from_pylist(rows, schema=schema), out)
    return {"shard": shard, "out": out, "sequences": len(rows), "no_coords": skipped}


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
    from esm3.train.data import DataError, resolve_paths
    from esm3.train.inverse_folding import DEFAULT_PER_STRUCTURE

    counts = {**DEFAULT_PER_STRUCTURE, **(per_structure or {})}
    check_ready(profile)
    items = []
    for d in cfg.data.datasets:
        if d.type != "structure":
            continue
        try:
            shards = resolve_paths(d.shards, data_root(ws), f"dataset {d.name!r} shards")
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


# --- command line ------------------------------------------------------------------------


def add_parser(subparsers: argparse._SubParsersAction, common: Any) -> None:
    p = subparsers.add_parser(
        "train",
        help="submit a training run (FSDP over nodes x tasks per node)",
        description=(
            "Submit the ESM3 training job: FSDP2 over nodes x tasks per node from the cluster "
            "profile, AdamW with warmup + cosine, staged data mixes, sharded checkpoints "
            "(resume, requeue on preemption), stability control, per-step metrics in the "
            "train_steps and events tables. Config and data are checked before submission."
        ),
        epilog=EXAMPLES + "\n" + common.epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help=f"training TOML, or a name in {CONFIG_DIR} (default: tiny)")
    common.workspace(p)
    common.cluster(p)
    p.add_argument("--nodes", type=int, help="nodes (default: the profile's)")
    p.add_argument("--tasks-per-node", type=int, help="ranks per node (default: the profile's)")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="check config and data, print the resolved config and sbatch script; submit nothing",
    )
    p.add_argument("--no-wait", action="store_true", help="submit and return the run id")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.set_defaults(fn=entry)


def entry(args: argparse.Namespace) -> int:
    profile = load_profile(args.cluster)
    res = _resources(profile, args.nodes, args.tasks_per_node)
    cfg = load_config(args.config, args.overrides)
    ws = wsp.prepare(args.workspace)
    if args.dry_run:
        world = (res.nodes or 1) * (res.tasks_per_node or 1)
        facts = check_inputs(cfg, ws, world, profile, res.tasks_per_node or 1)
        print(json.dumps(config_dict(cfg), indent=1, default=str))
        print(
            f"# {facts['param_count']:,} parameters; world size {world}; records {facts['records']}"
        )
        print(sbatch_script(ws, profile, args.nodes, args.tasks_per_node))
        return 0
    try:
        run_id, results = run_training(
            ws,
            profile,
            cfg,
            nodes=args.nodes,
            tasks_per_node=args.tasks_per_node,
            wait=not args.no_wait,
        )
    except launch.JobFailed as e:
        raise UserError(str(e)) from e
    if args.no_wait:
        print(run_id)
        return 0
    per_rank = results[0] if isinstance(results[0], list) else [results[0]]
    r0 = per_rank[0]
    print(f"run {run_id}: {r0['status']} at step {r0['step']} ({r0['param_count']:,} parameters)")
    return 0
