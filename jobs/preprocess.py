"""`esm3 preprocess sequences|structures|interpro|tokens|all`: the preprocessing pipelines
as submitit arrays (with afterok dependencies on SLURM, in order on the local executor).

The config (`jobs/configs/preprocess/*.toml`, see `jobs.stages.config`) is validated and
every input resolved before anything is recorded or submitted: a mistake is one line.
Data goes to <workspace>/data/preprocess/<config name>/; a re-run of the same command
skips every shard that is done, so after a crash or `scancel` it finishes the work and
ends with the same files and numbers. Table S3/S4 rows go to `dataset_stats` and
`token_stats`, refused records to `rejects`, all with the run id.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jobs.clusters import ClusterProfile
from jobs.errors import UserError
from jobs.stages.config import PreprocessConfig, check_inputs, load_config

WHAT = {
    "sequences": {"sequences"},
    "structures": {"structures"},
    "interpro": {"interpro"},
    "tokens": {"tokens"},
    "all": {"sequences", "structures", "interpro", "tokens"},
    "list": {"sequences", "structures"},  # the inventories alone, walked again
}

EXAMPLES = """examples:
  esm3 preprocess all                                   # the demo config on this machine
  esm3 preprocess sequences --config jobs/configs/preprocess/site-example.toml -c my-site
  esm3 preprocess structures --config my.toml purge.validation_size=1000 --dry-run
  esm3 preprocess list --config my.toml -c my-site      # walk the structure inputs again
  esm3 sql "SELECT * FROM dataset_stats ORDER BY computed_at DESC"
"""


@dataclass
class PreprocessResult:
    run_id: str
    what: str
    results: dict[str, list[Any]] = field(default_factory=dict)
    summary: str = ""


class _IntermixedParser(argparse.ArgumentParser):
    """Takes `key=value` overrides after options too (`all --config x seed=1`): plain
    argparse stops collecting positionals at the first option."""

    _inner = False

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[no-untyped-def]
        if self._inner:
            return super().parse_known_args(args, namespace)
        self._inner = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._inner = False


def add_parser(subparsers: argparse._SubParsersAction, common: Any) -> None:
    default_class = subparsers._parser_class
    subparsers._parser_class = _IntermixedParser
    try:
        _add_parser(subparsers, common)
    finally:
        subparsers._parser_class = default_class


def _add_parser(subparsers: argparse._SubParsersAction, common: Any) -> None:
    p = subparsers.add_parser(
        "preprocess",
        help="preprocessing arrays: sequences, structures, interpro, tokens, all",
        description=(
            "Run a preprocessing pipeline as job arrays: sequences (ingest -> mmseqs "
            "cluster -> expand -> validation purge -> Table S3/S4 stats), structures "
            "(filters, SASA, SS8, InterPro labels, clustering, stats), interpro (label "
            "ingest), tokens (structure codebook, then tokens), or all of them. Structure "
            "inputs are first inventoried by a `list` job (reused while the patterns are "
            "the same; `list` walks them again); the other stages are then planned from the "
            "inventory. On SLURM those stages are submitted at once with afterok "
            "dependencies; on 'local' stages run in order. Re-running the same command "
            "skips finished shards."
        ),
        epilog=EXAMPLES + "\n" + common.epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("what", choices=list(WHAT), help="which pipeline")
    p.add_argument(
        "--config", help="preprocessing TOML (default: jobs/configs/preprocess/demo.toml)"
    )
    common.workspace(p)
    common.cluster(p)
    p.add_argument(
        "--dry-run", action="store_true", help="check config and inputs, print the plan only"
    )
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides, e.g. seed=1"
    )
    p.set_defaults(fn=entry)


def entry(args: argparse.Namespace) -> int:
    from jobs import workspace
    from jobs.clusters import load_profile

    profile = load_profile(args.cluster)
    cfg = load_config(args.config, args.overrides)
    ws = workspace.prepare(args.workspace)
    res = run_preprocess(ws, profile, cfg, args.what, dry_run=args.dry_run)
    print(res.summary)
    return 0


def run_preprocess(
    ws: Path,
    profile: ClusterProfile,
    config: PreprocessConfig | str | Path | None,
    what: str = "all",
    overrides: Sequence[str] = (),
    *,
    dry_run: bool = False,
    progress: bool | None = None,
    timeout_s: float | None = None,
) -> PreprocessResult:
    """Check, plan, submit and follow one pipeline; returns the run id, the results of
    every stage and a printable summary. Raises UserError/ConfigError before submitting
    anything when the config or an input is wrong, launch.JobFailed when a job fails."""
    from esm3.metrics.lake import now
    from jobs import launch, locks, records
    from jobs.clusters import check_ready
    from jobs.config import to_dict
    from jobs.stages.inventory import plan_list, with_listings
    from jobs.stages.runner import (
        Layout,
        check_fingerprint,
        clean_scratch,
        lock_path,
        note,
        plan_lines,
        run_stages,
    )

    if what not in WHAT:
        raise UserError(f"unknown pipeline {what!r} (one of {', '.join(WHAT)})")
    cfg = config if isinstance(config, PreprocessConfig) else load_config(config, list(overrides))
    kinds = WHAT[what]
    _require_datasets(cfg, kinds)
    inputs = check_inputs(cfg, ws, kinds)
    lay = Layout.of(ws, cfg)
    check_ready(profile)  # before anything is recorded
    run_id = records.new_run_id("preprocess")
    lister, keys = plan_list(ws, run_id, cfg, inputs.patterns, inputs.metadata, lay,
                             again=what == "list")  # fmt: skip
    if what != "list":
        with_listings(cfg, inputs, lay, keys)
    if dry_run:
        stages = [lister] + (_plan(ws, run_id, cfg, inputs, lay, kinds) if what != "list" else [])
        lines = [f"plan for '{what}' on {profile.name} (nothing submitted); data in {lay.root}"]
        lines += plan_lines(profile, stages)
        lines += [f"  {name}: not listed yet; its stages are planned once `list` has run"
                  for name in inputs.patterns if name not in inputs.listings]  # fmt: skip
        lines += [f"  {name}: listed {_listed_when(got)}; `esm3 preprocess list` walks again"
                  for name, got in inputs.listings.items()]  # fmt: skip
        return PreprocessResult("", what, {}, "\n".join(lines))
    # one run per workspace and config: a second one would redo the same tasks and fight
    # over their scratch; the lock is taken before anything is recorded
    with locks.held(lock_path(lay), run_id, f"preprocessing of config {cfg.name!r} in {ws}"):
        for d, size in clean_scratch(lay):  # left by tasks of a run that was killed
            note(f"removed scratch of an earlier, stopped run: {d} ({size / 1e6:.1f} MB)")
        check_fingerprint(lay, cfg)
        launch.start_run(ws, kind="preprocess", name=f"{cfg.name}:{what}", profile=profile,
                         config=to_dict(cfg), run_id=run_id,
                         stages=["list"] if len(lister.items) else [])  # fmt: skip
        records.update_run(ws, run_id, status="RUNNING", started_at=now())
        try:
            results = run_stages(ws, profile, run_id, [lister], progress=progress,
                                 timeout_s=timeout_s)  # fmt: skip
            if what != "list":
                if lister.items:  # the listings just walked (the others were read above)
                    with_listings(cfg, inputs, lay, keys)
                walked = {item[2] for item in lister.items}
                for name, got in inputs.listings.items():
                    if name not in walked:
                        note(f"{name}: listing of {_listed_when(got)} reused "
                             "(`esm3 preprocess list` walks the inputs again)")  # fmt: skip
                stages = _plan(ws, run_id, cfg, inputs, lay, kinds)
                names = [s.name for s in [lister, *stages] if len(s.items)]
                records.update_run(ws, run_id, stages=",".join(names) or None)
                results |= run_stages(ws, profile, run_id, stages, progress=progress,
                                      timeout_s=timeout_s)  # fmt: skip
        except BaseException as e:
            launch.finish_run(ws, run_id, launch.run_status_after(e))
            raise
        if what != "list":
            _write_manifest(cfg, inputs, lay, kinds, run_id)
        launch.finish_run(ws, run_id, "COMPLETED")
        return PreprocessResult(run_id, what, results, summarize(ws, run_id, results, lay))


def _listed_when(listing: Any) -> str:
    meta = Path(listing.folder) / "listing.json"
    stamp = time.strftime("%Y-%m-%d %H:%M", time.localtime(meta.stat().st_mtime))
    return f"{stamp}: {listing.n_files} file(s), {listing.n_archives} archive(s)"


def _require_datasets(cfg: PreprocessConfig, kinds: set[str]) -> None:
    has_seq, has_struct = bool(cfg.of_type("sequence")), bool(cfg.of_type("structure"))
    has_ipr = cfg.interpro.any
    if kinds == {"sequences"} and not has_seq:
        raise UserError("the config has no sequence dataset (datasets with type = 'sequence')")
    if kinds & {"structures", "tokens"} and len(kinds) == 1 and not has_struct:
        raise UserError("the config has no structure dataset (datasets with type = 'structure')")
    if kinds == {"interpro"} and not has_ipr:
        raise UserError("the config names no InterPro input (interpro.protein2ipr/interproscan)")
    if not (has_seq or has_struct or has_ipr):
        raise UserError("the config names no dataset and no InterPro input: nothing to do")


def _plan(ws, run_id, cfg, inputs, lay, kinds):  # type: ignore[no-untyped-def]
    from jobs.stages.sequences import plan_sequences
    from jobs.stages.stores import plan_stores
    from jobs.stages.structures import plan_interpro, plan_structures

    # the InterPro stages once, for the sequence and structure records that need them
    stages, ipr, sites = [], [], []
    if kinds & {"sequences", "structures", "interpro"}:
        stages, ipr, sites = plan_interpro(ws, run_id, cfg, inputs, lay)
    if "sequences" in kinds:
        stages += plan_sequences(ws, run_id, cfg, inputs.datasets, lay, (ipr, sites))
    if kinds & {"structures", "tokens"}:
        stages += plan_structures(ws, run_id, cfg, inputs, lay, process="structures" in kinds,
                                  tokens="tokens" in kinds, annotations=ipr)  # fmt: skip
    made = lay.tokenizer(cfg.codebook.kind).exists()
    outputs = _outputs(cfg, inputs, lay, kinds, tokens="tokens" in kinds or made)
    if outputs:  # the last stage: each dataset's training store
        stages += plan_stores(ws, run_id, cfg, outputs, lay, [s.name for s in stages])
    return stages


def _outputs(cfg, inputs, lay, kinds, *, tokens: bool) -> dict:  # type: ignore[no-untyped-def]
    """The final shards and clusters of each dataset the pipeline writes (manifest entries)."""
    from jobs.stages.sequences import sequence_outputs
    from jobs.stages.structures import structure_outputs

    out = {}
    if "sequences" in kinds:
        out.update(sequence_outputs(cfg, inputs.datasets, lay))
    if kinds & {"structures", "tokens"}:
        out.update(structure_outputs(cfg, inputs, lay, tokens=tokens))
    return out


def _write_manifest(cfg, inputs, lay, kinds, run_id) -> None:  # type: ignore[no-untyped-def]
    """What training reads: each dataset's store (and the shards and clusters it was written
    from), the validation set, codebook, labels."""
    from jobs.stages.runner import write_text_atomic

    old = json.loads(lay.manifest.read_text()) if lay.manifest.exists() else {}
    datasets = dict(old.get("datasets", {}))
    tokenizer = lay.tokenizer(cfg.codebook.kind)
    datasets.update(_outputs(cfg, inputs, lay, kinds, tokens=tokenizer.exists()))
    for name, entry in datasets.items():  # the training store each dataset's last stage wrote
        store = lay.store(name)
        entry["store"] = str(store) if (store / "store.json").exists() else None
    manifest = {
        "config": cfg.name,
        "run_id": run_id,
        "datasets": datasets,
        "validation": str(lay.validation) if lay.validation.exists() else None,
        "structure_codebook": str(tokenizer) if tokenizer.exists() else None,
        "structure_tokenizer": cfg.codebook.kind if tokenizer.exists() else None,
        "interpro": sorted(str(p) for p in lay.interpro.glob("*.parquet")),
        # the function / residue-annotation labels (training's `data.vocabulary`)
        "vocabulary": str(lay.vocabulary) if lay.vocabulary.exists() else None,
    }
    lay.root.mkdir(parents=True, exist_ok=True)
    # lazy shard lists (`ShardPaths`) are written out as lists
    write_text_atomic(lay.manifest, json.dumps(manifest, indent=1, default=list))


def _sum(rows: list[Any], key: str) -> int:
    return int(sum(r.get(key) or 0 for r in rows if isinstance(r, dict)))


def summarize(ws: Path, run_id: str, results: dict[str, list[Any]], lay: Any) -> str:
    """Counts per stage, then the run's Table S3 and S4 rows as `esm3 sql` shows them."""
    import pandas as pd

    from esm3.metrics.catalog import query

    lines = [f"run {run_id}: data in {lay.root}"]
    for r in results.get("list", []):
        kept = (
            f" ({r['prefilter']['kept']} kept by the metadata prefilter)"
            if "prefilter" in r
            else ""
        )
        lines.append(f"  list {r['dataset']}: {r['listed_files']} files{kept}, "
                     f"{r['archives']} archives")  # fmt: skip
    if "ingest" in results:
        r = results["ingest"]
        lines.append(f"  ingest: {_sum(r, 'records')} records -> {_sum(r, 'written')} sequences, "
                     f"{_sum(r, 'rejected')} rejected, {len(r)} shard(s)")  # fmt: skip
    if "cluster" in results or "structure-cluster" in results:
        tasks = results.get("cluster", []) + results.get("structure-cluster", [])
        for r in (level for t in tasks for level in t["levels"]):  # one task per dataset
            name = Path(r["clusters_file"]).parent.name
            lines.append(f"  cluster {name} at {r['level']:g}: {r['clusters']} clusters "
                         f"of {r['sequences']}")  # fmt: skip
    if "purge" in results:
        r = results["purge"]
        lines.append(f"  purge: kept {_sum(r, 'kept')}, blacklisted {_sum(r, 'blacklisted')} "
                     "(>= threshold identity to validation)")  # fmt: skip
    if "structures" in results:
        r = results["structures"]
        lines.append(f"  structures: {_sum(r, 'files')} files, {_sum(r, 'chains_kept')} chains "
                     f"kept, {_sum(r, 'rejected')} rejected")  # fmt: skip
    if "tokenize" in results:
        lines.append(f"  tokens: {_sum(results['tokenize'], 'tokens')} structure tokens")
    for r in results.get("store", []):
        if isinstance(r, dict):
            done = (
                "unchanged"
                if r.get("skipped")
                else f"{r['records']} records, {r['centers']} centers"
            )
            lines.append(f"  store {r['dataset']}: {done} ({r['store']})")
    rej = query(ws, "SELECT stage, reason, count(*) AS n FROM rejects WHERE run_id = ? "
                "GROUP BY ALL ORDER BY stage, n DESC", [run_id])  # fmt: skip
    if len(rej):
        lines.append("  rejects: " + ", ".join(f"{s}/{r} {n}" for s, r, n in rej.itertuples(False)))
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        s3 = query(ws, """SELECT dataset, type, clustering_level AS clus_level,
                clustering_count AS clus_count, expansion_level AS exp_level,
                expansion_count AS exp_count, sequences, round(avg_length, 1) AS avg_len,
                tokens, release FROM dataset_stats WHERE run_id = ?
                ORDER BY type, dataset""", [run_id])  # fmt: skip
        if len(s3):
            lines += ["", "Table S3 (dataset_stats):", s3.to_string(index=False)]
        s4 = query(
            ws,
            """SELECT dataset, type, token_budget, round(repeats, 3) AS repeats,
                round(unique_samples, 1) AS unique_samples, round(unique_tokens) AS unique_tokens
                FROM token_stats WHERE run_id = ? ORDER BY type, dataset""",
            [run_id],
        )
        if len(s4):
            lines += ["", "Table S4 (token_stats):", s4.to_string(index=False)]
    return "\n".join(lines)


def demo(
    ws: Path,
    profile: ClusterProfile,
    config: PreprocessConfig | str | Path | None = None,
    overrides: Sequence[str] = (),
) -> str:
    """`make demo`: every pipeline on the demo config (20,000 real UniProt sequences of
    Debian's mmseqs2-examples, real PDB/mmCIF files of MDAnalysisTests); the summary."""
    return run_preprocess(ws, profile, config, "all", overrides).summary
