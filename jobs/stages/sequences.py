"""The sequence pipeline: split -> ingest -> cluster -> expand; validation -> purge; stats.

Array tasks (module-level, run in the job process):
- split:      one task per input file with `split > 1`: `split_fasta` into plain shards
- ingest:     one task per input shard: `ingest_fasta` (FASTA files, shards and archives
              such as JGI's per-genome tarballs) or `ingest_oas` (OAS data units) ->
              Parquet; rejects to the lake
- cluster:    one task per dataset: mmseqs linclust with the paper's flags at each level
- expand:     one task per dataset: two-level expansion, cap 20 (single level: cap only)
- validation: one task: the validation set of every purged dataset
- purge:      one task per training shard: easy-search against validation, blacklist
- sequence-stats: one task: final clusters (members still in training), Table S3/S4 rows
- annotate:   one task per final shard (when the config has InterPro inputs): the shard
              with its InterPro `annotations` and site `residue_annotations` (a DuckDB
              join, `esm3.data.sequence_annotations`), what training reads

Structure datasets are clustered by the same `cluster_task` / `expand_task`.
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from esm3.data.clusters import expand_cluster_files
from esm3.data.duck import connect
from esm3.data.fasta import ingest_fasta, split_fasta
from esm3.data.mmseqs import cluster_shards
from esm3.data.oas import ingest_oas
from esm3.data.purge import purge_shard, write_validation
from esm3.data.sequence_annotations import annotate_sequence_shard
from esm3.data.shards import atomic_path, sql_path
from esm3.data.token_stats import cluster_table, dataset_stats_row, token_stats_row
from jobs.clusters import MMSEQS_RUNNER_ENV, SCRATCH_ENV
from jobs.stages.config import DatasetConfig, PreprocessConfig
from jobs.stages.runner import (
    Layout,
    Stage,
    job_cpus,
    job_memory_limit,
    output_key,
    record_rejects,
    record_stats,
    say,
    stage_resources,
)

# --- tasks ---------------------------------------------------------------------------------


def split_task(ws: str, run_id: str, src: str, out_dir: str, n: int) -> dict:
    outs = split_fasta(src, out_dir, n)
    say("split", f"{src} -> {n} shard(s) in {out_dir}")
    return {"source": src, "shards": [str(o) for o in outs]}


def ingest_task(
    ws: str,
    run_id: str,
    src: str,
    out: str,
    dataset: str,
    header: str,
    lowercase: str,
    fmt: str = "fasta",
    members: list[str] | None = None,
) -> dict:
    """One input (a FASTA file or shard, a FASTA archive, an OAS data unit) -> one shard."""
    if fmt == "oas":
        summary, rejects = ingest_oas(src, out, dataset=dataset, lowercase=lowercase)
    else:
        summary, rejects = ingest_fasta(src, out, dataset=dataset, header_format=header,
                                        lowercase=lowercase, members=members or ())  # fmt: skip
    record_rejects(ws, run_id, output_key(ws, out), rejects)
    verb = "already done" if summary.get("skipped") else "ingested"
    say("ingest", f"{src}: {verb}: {summary['written']} rows, {len(rejects)} rejected -> {out}")
    return summary


def cluster_task(
    ws: str, run_id: str, shards: list[str], outs: list[str], levels: list[float]
) -> dict:
    """Cluster the sequences (id, sequence columns) of Parquet shards at every level (one
    mmseqs database for all), `outs[i]` the clusters at `levels[i]`."""
    threads, memory, scratch = job_cpus(), job_memory_limit(), _scratch(outs[0])
    shards = list(shards)  # a lazy ShardPaths for structure datasets
    if not all(Path(o).exists() for o in outs):
        _check_unique_ids(shards, memory, threads, scratch)
    summaries = cluster_shards(
        shards,
        dict(zip(levels, outs, strict=True)),
        scratch,
        threads=threads,
        split_memory_limit=memory,
        memory_limit=memory,
        runner=os.environ.get(MMSEQS_RUNNER_ENV) or None,
    )
    for s in summaries:
        say("cluster", f"{len(shards)} shard(s) at {s['level']:g}: {s['clusters']} clusters of "
            f"{s['sequences']} sequences ({threads} threads) -> {s['clusters_file']}")  # fmt: skip
    return {"levels": summaries}


def _scratch(out: str) -> Path:
    """Where mmseqs' database and temporary files go: the profile's node-local scratch
    (ESM3_SCRATCH), else a `tmp` folder next to the output (removed by a re-run)."""
    local = os.environ.get(SCRATCH_ENV, "")
    return Path(local) / "esm3-mmseqs" if local else Path(out).parent / "tmp"


def _check_unique_ids(shards: list[str], memory: str | None, threads: int, scratch: Path) -> None:
    """Ingest drops repeated ids within a shard; one id in two shards (e.g. two input files
    that overlap) would make mmseqs' clusters ambiguous: refuse it, naming the shards."""
    con = connect(
        memory, threads, scratch / "duckdb"
    )  # the GROUP BY spills beyond the job's memory
    try:
        dups = con.execute(
            """SELECT id, list(DISTINCT filename) FROM read_parquet(?, filename = true)
               GROUP BY id HAVING count(*) > 1 ORDER BY id LIMIT 3""",
            [[str(s) for s in shards]],
        ).fetchall()
    finally:
        con.close()
    if dups:
        rid, where = dups[0]
        raise ValueError(f"sequence id {rid!r} occurs in more than one shard ({', '.join(where)}); "
                         "ids must be unique within a dataset")  # fmt: skip


def expand_task(
    ws: str, run_id: str, low: str, high: str | None, out: str, cap: int, seed: int
) -> dict:
    summary, _ = expand_cluster_files(
        low,
        high,
        out,
        cap=cap,
        seed=seed,
        threads=job_cpus(),
        memory_limit=job_memory_limit(),
        temp_dir=Path(out).parent / "tmp",
    )
    say("expand", f"{out}: {summary.get('centers')} centers, {summary.get('members')} members, "
        f"{summary.get('dropped_by_cap')} dropped by the cap of {cap}")  # fmt: skip
    return summary


def validation_task(ws: str, run_id: str, shards: list[str], out: str, n: int, seed: int) -> dict:
    summary, _ = write_validation(shards, out, n, seed)
    say("validation", f"{summary['by_dataset']} -> {out}")
    return summary


def purge_task(
    ws: str,
    run_id: str,
    train: str,
    validation: str,
    out: str,
    blacklist: str,
    min_identity: float,
) -> dict:
    summary, rejects = purge_shard(
        train,
        validation,
        out,
        blacklist,
        Path(out).parent / "tmp",
        min_identity=min_identity,
        threads=job_cpus(),
        split_memory_limit=job_memory_limit(),
    )
    record_rejects(ws, run_id, output_key(ws, out), rejects)
    say("purge", f"{train}: kept {summary['kept']}, blacklisted {summary['blacklisted']}")
    return summary


def annotate_task(
    ws: str, run_id: str, src: str, out: str, interpro: list[str], sites: list[str]
) -> dict:
    summary = annotate_sequence_shard(
        src, out, interpro, sites, threads=job_cpus(), memory_limit=job_memory_limit(),
        temp_dir=Path(out).parent / "tmp",
    )  # fmt: skip
    say("annotate", f"{src}: {summary['annotated']} of {summary['rows']} records with InterPro "
        f"labels, {summary['with_sites']} with sites -> {out}")  # fmt: skip
    return summary


def final_clusters(expanded: str | Path, shards: list[str], out: str | Path) -> Path:
    """The expanded clusters restricted to members still in the training shards (purge
    removed validation and blacklisted ids), in the expansion's order. Idempotent."""
    out = Path(out)
    if out.exists():
        return out
    con = connect()
    try:
        with atomic_path(out) as tmp:
            # COPY's target cannot be bound: it goes in quoted by sql_path; the inputs are bound
            con.execute(
                f"""COPY (SELECT e.center, e.member
                    FROM read_parquet($expanded, file_row_number = true) e
                    SEMI JOIN read_parquet($shards) s ON e.member = s.id
                    ORDER BY e.file_row_number)
                    TO {sql_path(tmp)} (FORMAT parquet, COMPRESSION zstd)""",  # noqa: S608
                {"expanded": str(expanded), "shards": [str(s) for s in shards]},
            )
    finally:
        con.close()
    return out


def stats_rows(
    dataset: str,
    kind: str,
    clusters: str | Path,
    sequences: list[str] | pa.Table,
    *,
    clustering_level: float | None,
    expansion_level: float | None,
    release: str,
    token_budget: int,
) -> tuple[dict, dict]:
    """(dataset_stats row, token_stats row) of one dataset from its final clusters and the
    sequences' (id, length); zero rows when every member was removed."""
    import numpy as np

    if pq.read_metadata(clusters).num_rows:
        ct = cluster_table(str(clusters), sequences)
        n, tokens = ct["n"], ct["tokens"]
    else:
        n = tokens = np.zeros(0, dtype=np.int64)
    s3 = dataset_stats_row(
        dataset=dataset,
        type=kind,
        clustering_level=clustering_level,
        expansion_level=expansion_level,
        n=n,
        tokens=tokens,
        release=release,
    )
    if len(n):
        s4 = token_stats_row(
            dataset=dataset, type=kind, n=n, tokens=tokens, token_budget=token_budget
        )
    else:
        s4 = dict(dataset=dataset, type=kind, token_budget=token_budget, repeats=0.0,
                  unique_samples=0.0, unique_tokens=0.0)  # fmt: skip
    return s3, s4


def sequence_stats_task(ws: str, run_id: str, specs: list[dict]) -> dict:
    """Per dataset: final clusters, then one `dataset_stats` and one `token_stats` row
    (keyed by the final clusters file: a re-run replaces them)."""
    s3_rows, s4_rows = [], []
    for sp in specs:
        final = final_clusters(sp["expanded"], sp["shards"], sp["final"])
        s3, s4 = stats_rows(
            sp["dataset"],
            "sequence",
            final,
            sp["shards"],
            clustering_level=sp["levels"][0],
            expansion_level=sp["levels"][1] if len(sp["levels"]) > 1 else None,
            release=sp["release"],
            token_budget=sp["token_budget"],
        )
        s3_rows.append(s3)
        s4_rows.append(s4)
        record_stats(ws, run_id, output_key(ws, final), "dataset_stats", [s3])
        record_stats(ws, run_id, output_key(ws, final), "token_stats", [s4])
        say("sequence-stats", f"{sp['dataset']}: {s3['clustering_count']} centers, "
            f"{s3['sequences']} sequences, {s3['tokens']} tokens; "
            f"{s4['unique_samples']:.0f} unique samples at {s4['repeats']:.3g} repeats")  # fmt: skip
    return {"dataset_stats": _plain(s3_rows), "token_stats": _plain(s4_rows)}


def _plain(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("computed_at", "run_id")} for r in rows]


# --- plan ----------------------------------------------------------------------------------


def token_budgets(cfg: PreprocessConfig) -> dict[str, int]:
    """Each dataset's share of the token budget, by its mixing weight."""
    total = sum(d.weight for d in cfg.datasets) or 1.0
    return {d.name: int(round(cfg.tokens.budget * d.weight / total)) for d in cfg.datasets}


def ingest_units(d: DatasetConfig, files: list[Path], lay: Layout) -> tuple[list, list]:
    """(split items, [(input shard, ingest output)]) for one dataset, deterministic names.
    An archive or an OAS unit is one unit (check_inputs refuses `split` for them)."""
    splits, units = [], []
    for fi, f in enumerate(files):
        if d.split > 1:
            out_dir = lay.seq(d.name) / "split" / f"{fi:05d}"
            splits.append((str(f), str(out_dir), d.split))
            stem = f.name.removesuffix(".gz").rsplit(".", 1)[0]
            parts = [out_dir / f"{stem}.{k:05d}-of-{d.split:05d}.fasta" for k in range(d.split)]
        else:
            parts = [f]
        units += parts
    outs = [lay.seq(d.name) / "ingest" / f"{i:05d}.parquet" for i in range(len(units))]
    return splits, list(zip(units, outs, strict=True))


def plan_sequences(
    ws: Path,
    run_id: str,
    cfg: PreprocessConfig,
    files: dict[str, list[Path]],
    lay: Layout,
    labels: tuple[list[str], list[str]] = ([], []),
) -> list[Stage]:
    """The sequence pipeline's stages for the datasets in `files`; `labels`: the ingested
    InterPro and site tables (the `interpro` stage's outputs) the records are joined with."""
    w = str(ws)
    datasets = [d for d in cfg.of_type("sequence") if d.name in files]
    split_items, ingest_items, cluster_items, expand_items, purge_items = [], [], [], [], []
    shards: dict[str, list[str]] = {}
    for d in datasets:
        splits, units = ingest_units(d, files[d.name], lay)
        split_items += [(w, run_id, *s) for s in splits]
        ingest_items += [(w, run_id, str(u), str(o), d.name, d.header, d.lowercase, d.format,
                          list(d.members)) for u, o in units]  # fmt: skip
        shards[d.name] = [str(o) for _, o in units]
        cluster_items.append((w, run_id, shards[d.name],
                              [str(lay.level_file(d.name, lv)) for lv in d.levels],
                              list(d.levels)))  # fmt: skip
        high = str(lay.level_file(d.name, d.levels[1])) if len(d.levels) > 1 else None
        expand_items.append((w, run_id, str(lay.level_file(d.name, d.levels[0])), high,
                             str(lay.expanded_file(d.name)), d.cap, cfg.seed))  # fmt: skip
    purged = [d for d in datasets if d.purge and cfg.purge.enabled]
    final: dict[str, list[str]] = dict(shards)
    for d in purged:
        final[d.name] = []
        for s in shards[d.name]:
            out = lay.seq(d.name) / "purged" / Path(s).name
            black = lay.seq(d.name) / "blacklist" / Path(s).name
            purge_items.append((w, run_id, s, str(lay.validation), str(out), str(black),
                                cfg.purge.min_identity))  # fmt: skip
            final[d.name].append(str(out))
    validation_items = []
    if purged:
        all_train = [s for d in purged for s in shards[d.name]]
        validation_items.append((w, run_id, all_train, str(lay.validation),
                                 cfg.purge.validation_size, cfg.seed))  # fmt: skip
    budgets = token_budgets(cfg)
    specs = [
        dict(dataset=d.name, expanded=str(lay.expanded_file(d.name)), shards=final[d.name],
             final=str(lay.final_clusters(d.name)), levels=list(d.levels), release=d.release,
             token_budget=budgets[d.name])
        for d in datasets
    ]  # fmt: skip
    stats_items = [(w, run_id, specs)] if specs else []
    annotate_items = [
        (w, run_id, src, str(annotated_shard(lay, d.name, src)), *labels)
        for d in datasets if cfg.interpro.any for src in final[d.name]
    ]  # fmt: skip

    def st(name, fn, items, after):
        return Stage(name, fn, items, after, stage_resources(cfg, name))

    return [
        st("split", split_task, split_items, []),
        st("ingest", ingest_task, ingest_items, ["split"]),
        st("cluster", cluster_task, cluster_items, ["ingest"]),
        st("expand", expand_task, expand_items, ["cluster"]),
        st("validation", validation_task, validation_items, ["ingest"]),
        st("purge", purge_task, purge_items, ["validation"]),
        st("sequence-stats", sequence_stats_task, stats_items, ["expand", "purge"]),
        st("annotate", annotate_task, annotate_items, ["ingest", "purge", "interpro"]),
    ]


def annotated_shard(lay: Layout, dataset: str, shard: str | Path) -> Path:
    return lay.seq(dataset) / "annotated" / Path(shard).name


def sequence_outputs(cfg: PreprocessConfig, files: dict[str, list[Path]], lay: Layout) -> dict:
    """What the training loader reads per sequence dataset (the manifest's entries)."""
    out = {}
    for d in cfg.of_type("sequence"):
        if d.name not in files:
            continue
        _, units = ingest_units(d, files[d.name], lay)
        sub = "purged" if d.purge and cfg.purge.enabled else "ingest"
        sub = "annotated" if cfg.interpro.any else sub
        out[d.name] = {
            "type": "sequence",
            "shards": [str(lay.seq(d.name) / sub / o.name) for _, o in units],
            "clusters": str(lay.final_clusters(d.name)),
            "weight": d.weight,
        }
    return out
