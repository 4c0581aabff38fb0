"""The `esm3 train` subcommand: parse, check, print (--dry-run) or submit and report."""

from __future__ import annotations

import argparse
import json
from typing import Any

from jobs import launch
from jobs import workspace as wsp
from jobs.clusters import load_profile
from jobs.errors import UserError
from jobs.train.config import CONFIG_DIR, check_inputs, config_dict, data_root, load_config
from jobs.train.submit import job_resources, run_training, sbatch_script
from jobs.train.vocabulary import with_vocabulary

EXAMPLES = """examples:
  esm3 train --config jobs/configs/train/tiny.toml --cluster local
  esm3 train --config jobs/configs/train/esm3_1.4b.toml --cluster site-example --dry-run
  esm3 train --config jobs/configs/train/tiny.toml -c slurm-local --nodes 2 optim.lr=1e-3
"""


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
    res = job_resources(profile, args.nodes, args.tasks_per_node)
    cfg = load_config(args.config, args.overrides)
    ws = wsp.prepare(args.workspace)
    if args.dry_run:
        world = (res.nodes or 1) * (res.tasks_per_node or 1)
        cfg = with_vocabulary(cfg, data_root(ws))
        facts = check_inputs(cfg, ws, world, profile, res.tasks_per_node or 1, build_stores=False)
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
