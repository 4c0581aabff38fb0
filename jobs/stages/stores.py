"""The preprocessing's last stage: one training store per dataset (esm3.data.store), from
the dataset's final shards and clusters, with the codebook its tokens came from. The
manifest names each store; training opens them memory-mapped."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jobs.stages.runner import Layout, Stage, job_cpus, job_memory_limit, say, stage_resources


def store_task(
    ws: str, run_id: str, name: str, type: str, records: list[str], clusters: list[str],
    codebook: str | None, vocabulary: str | None, out: str,
) -> dict[str, Any]:  # fmt: skip
    """One array task: the store of one dataset; skipped when the store on disk was written
    from the same files (same paths, sizes and modification times)."""
    from esm3.data.store import StoreSources, sources_fingerprint, write_store

    def present(p: str | None) -> Path | None:
        return Path(p) if p and Path(p).exists() else None

    sources = StoreSources([Path(p) for p in records], [Path(p) for p in clusters], [],
                           present(codebook), present(vocabulary))  # fmt: skip
    digest = sources_fingerprint(sources)
    meta_path = Path(out) / "store.json"
    if meta_path.exists():
        try:
            if json.loads(meta_path.read_text()).get("sources_fingerprint") == digest:
                return {"dataset": name, "store": out, "skipped": True}
        except ValueError:
            pass  # unreadable: write it again
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    meta = write_store(
        out, name, type, sources, memory_limit=job_memory_limit(), threads=job_cpus(),
        extra={"sources_fingerprint": digest, "run_id": run_id},
    )  # fmt: skip
    say("store", f"{name}: {meta['rows']} records, {meta['centers']} centers -> {out}")
    return {"dataset": name, "store": out, "records": meta["rows"], "centers": meta["centers"]}


def plan_stores(
    ws: Path, run_id: str, cfg: Any, outputs: dict[str, dict], lay: Layout, after: list[str]
) -> list[Stage]:
    """The store stage over the datasets in `outputs` (the manifest entries of the stages
    planned before it, which it runs after), with the codebook (structure stores) and the
    annotation vocabulary they were built with, where the preprocessing has them."""
    items = []
    for name, o in outputs.items():
        codebook = str(lay.tokenizer(cfg.codebook.kind)) if o["type"] == "structure" else None
        clusters = [o["clusters"]] if o.get("clusters") else []
        items.append((str(ws), run_id, name, o["type"], o["shards"], clusters, codebook,
                      str(lay.vocabulary), str(lay.store(name))))  # fmt: skip
    return [Stage("store", store_task, items, after, stage_resources(cfg, "store"))]
