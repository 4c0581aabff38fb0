"""Submitting a training run: check everything, record the run, submit one job of nodes x
tasks per node ranks (`job.TrainJob`), and optionally wait; the demo's short run."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from esm3.metrics.lake import now, write_rows
from jobs import launch, records
from jobs import workspace as wsp
from jobs.clusters import ClusterProfile, Resources, check_ready, load_profile, make_executor
from jobs.config import ConfigError
from jobs.train.config import CONFIG_DIR, check_inputs, config_dict, data_root, load_config
from jobs.train.job import TrainJob, train_job
from jobs.train.vocabulary import with_vocabulary

STAGE = "train"


def job_resources(profile: ClusterProfile, nodes: int | None, tasks: int | None) -> Resources:
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
    res = job_resources(profile, nodes, tasks_per_node)
    world = (res.nodes or 1) * (res.tasks_per_node or 1)
    check_ready(profile)
    cfg = with_vocabulary(cfg, data_root(ws))  # the labels travel with the job's config
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
        params = job_resources(profile, nodes, tasks)
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
        "SELECT * FROM train_steps WHERE run_id = ? ORDER BY step",
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
        + "\n"
        + last_stage_losses(df)
    )


def last_stage_losses(df: Any, window: int = 5) -> str:
    """Each track's mean loss over the first and the last `window` steps of the last stage."""
    from esm3.tokenize.tracks import CATEGORICAL_TRACKS

    last = df[df.stage == df.stage.iloc[-1]]
    parts = [
        f"{t} {last[f'loss_{t}'].iloc[:window].mean():.3f} -> "
        f"{last[f'loss_{t}'].iloc[-window:].mean():.3f}"
        for t in CATEGORICAL_TRACKS
        if f"loss_{t}" in last
    ]
    return (
        f"stage {last.stage.iloc[-1]!r} loss by track (first -> last {window} steps): "
        + ", ".join(parts)
    )
