"""Shard-level stages: what one array task runs for one shard of structure files.

Each stage takes its inputs, an explicit output path and parameters, writes its output
under a temporary name and renames it, skips the work when the output already exists, and
returns a `ShardResult` (summary counts, reject rows). A bad file or chain becomes a reject
row; it never stops the shard. A missing tool (mkdssp) is an error of the environment,
not of the data: it raises `ToolError` before any file is read.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa

from esm3.data.archives import STRUCTURE_MEMBERS, ArchiveError, ArchivePart, WalkStats, iter_members
from esm3.data.duck import connect
from esm3.data.interpro import Annotation, load_annotations, map_annotations
from esm3.data.shards import Source, duckdb_source, streamed
from esm3.data.structures.filters import (
    AFDBFilter,
    ESMAtlasFilter,
    MetadataLookup,
    PDBFilter,
    check_afdb_chain,
    check_esmatlas_chain,
    check_pdb_entry,
    normalize_plddt,
)
from esm3.data.structures.io import (
    Entry,
    ParsedChain,
    StructureReadError,
    file_stem,
    read_structure,
)
from esm3.data.structures.records import (
    ShardResult,
    ShardRowWriter,
    read_shard,
    reject,
    stored_result,
    write_shard,
)
from esm3.data.structures.sasa import residue_sasa
from esm3.data.structures.ss8 import file_ss8
from esm3.tokenize.structure import KMeansStructureTokenizer, StructureTokenizer
from esm3.tool import MKDSSP, Tool

DATASETS = ("pdb", "afdb", "esmatlas")
_AFDB_NAME = re.compile(r"AF-([A-Za-z0-9]+)-F(\d+)")
BACKBONE_BATCH_ROWS = 1024  # chains per batch when streaming shard coordinates
AFDB_FRAGMENT_STEP = 200  # AFDB splits long proteins into fragments starting every 200 residues
# residues of chains held before a structure shard writes them (and looks up their InterPro
# labels, a scan of the label tables): memory follows this, not the shard, which can be a
# whole archive; a shard of plain files is usually written in one go, as before
WRITE_RESIDUES = 1_000_000


@dataclass(frozen=True)
class StructureStageConfig:
    """Parameters of the structures stage; defaults follow the paper (Table S5 for features)."""

    dataset: str = "pdb"  # pdb | afdb | esmatlas
    pdb: PDBFilter = field(default_factory=PDBFilter)
    afdb: AFDBFilter = field(default_factory=AFDBFilter)
    esmatlas: ESMAtlasFilter = field(default_factory=ESMAtlasFilter)
    sasa: bool | None = None  # None: AFDB and ESMAtlas only (Table S5)
    ss8: bool = True  # Table S5: PDB, AFDB, ESMAtlas
    plddt_scale: str = "auto"  # auto | 0-1 | 0-100
    min_residues: int = 1  # residues with a complete backbone
    sasa_points: int = 1000  # sphere points per atom (biotite's default)

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {DATASETS}, got {self.dataset!r}")

    @property
    def compute_sasa(self) -> bool:
        return self.dataset != "pdb" if self.sasa is None else self.sasa


@dataclass
class StepTimes:
    """Seconds spent per step, summed over a shard (for the benchmark)."""

    parse: float = 0.0
    filter: float = 0.0
    sasa: float = 0.0
    ss8: float = 0.0
    tokens: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return dict(vars(self))


def process_structure_shard(
    files: Sequence[str | Path | ArchivePart],
    out_path: str | Path,
    config: StructureStageConfig,
    *,
    esmatlas_metadata: Mapping[str, tuple[float, float]] | str | Path | None = None,
    annotations: Mapping[str, list[Annotation]] | Sequence[str | Path] | None = None,
    tokenizer: StructureTokenizer | str | Path | None = None,
    dssp: Tool = MKDSSP,
    times: StepTimes | None = None,
) -> ShardResult:
    """Parse, filter and annotate one shard of structure files into one Parquet file.

    files: structure files, or `ArchivePart`s of tar bundles (AFDB, ESMAtlas) whose members
    are read in place one at a time; a member's rows and rejects name it
    `<archive>:<member>`, its entry id is the member's file name without the extensions.
    Without `members` globs every member of a bundle must be a structure file (by name):
    others are `not_a_structure` rejects; with them, members they leave out are skipped
    (counted). A truncated or corrupt archive is one `truncated_archive` reject naming the
    member; what was read before stays.
    esmatlas_metadata: id -> (mean pLDDT, pTM), or a table path (required for ESMAtlas).
    annotations: accession -> InterPro annotations, or ingested InterPro Parquet paths.
    tokenizer: a fitted tokenizer or a saved codebook; None leaves structure_tokens null.
    Returns summary counts (files, files_unreadable, entries_filtered, chains, chains_kept,
    chains_rejected, residues, annotated; for archives also members, members_skipped,
    archive_errors; skipped when the output existed) and reject rows.
    """
    out_path = Path(out_path)
    if out_path.exists():
        return stored_result(out_path)
    cfg = config
    if cfg.ss8:
        dssp.path()  # fail fast, with the reason, when mkdssp is missing ...
        dssp.version()  # ... or too old (the version check is cached per process)
    if cfg.dataset == "esmatlas":
        if esmatlas_metadata is None:
            raise ValueError("ESMAtlas needs esmatlas_metadata (id -> pLDDT, pTM)")
        if not isinstance(esmatlas_metadata, Mapping):
            # only this shard's rows: an entry's id is its file name's stem (a bundle's
            # members are looked up batch by batch as they are read)
            esmatlas_metadata = MetadataLookup(esmatlas_metadata)
            esmatlas_metadata.need(
                file_stem(Path(f)) for f in files if not isinstance(f, ArchivePart)
            )
    if tokenizer is not None and not isinstance(tokenizer, StructureTokenizer):
        tokenizer = KMeansStructureTokenizer.load(tokenizer)
    times = times if times is not None else StepTimes()

    rows: list[dict] = []  # the batch not yet written
    held = [0]  # its residues
    rejects: list[dict] = []
    counts = {"files": 0, "files_unreadable": 0, "entries_filtered": 0, "chains": 0}
    counts |= {"chains_kept": 0, "chains_rejected": 0, "annotated": 0, "residues": 0}

    def flush() -> None:
        if annotations is not None:
            _attach(rows, annotations)
        counts["annotated"] += sum(1 for r in rows if r["annotations"])
        counts["residues"] += sum(len(r["sequence"]) for r in rows)
        writer.write(_strip_private(rows))
        rows.clear()
        held[0] = 0

    def one(f: str | Path, name: Path, data: bytes | None = None) -> None:
        """One structure file (`data`: its bytes when it is an archive member named `f`)."""
        counts["files"] += 1
        try:
            file_rows, file_rejects, n_chains, filtered = _process_file(
                name, cfg, esmatlas_metadata, tokenizer, dssp, times, data=data, source=str(f)
            )
        except StructureReadError as e:
            file_rows, file_rejects, n_chains = [], [_file_reject(f, e.reason, e.detail)], 0
        except Exception as e:  # noqa: BLE001 - a bad file must never stop the shard
            detail = f"{type(e).__name__}: {e}"
            file_rows, file_rejects, n_chains = [], [_file_reject(f, "error", detail)], 0
        if n_chains == 0:
            counts["files_unreadable"] += 1
        elif filtered:
            counts["entries_filtered"] += 1
        counts["chains"] += n_chains
        counts["chains_kept"] += len(file_rows)
        counts["chains_rejected"] = counts["chains"] - counts["chains_kept"]
        rows.extend(file_rows)
        rejects.extend(file_rejects)
        held[0] += sum(len(r["sequence"]) for r in file_rows)
        if held[0] >= WRITE_RESIDUES:
            flush()

    if annotations is not None and not isinstance(annotations, Mapping):
        annotations = list(annotations)  # paths, read again for each batch's accessions
    with ShardRowWriter(out_path) as writer:
        for f in files:
            if isinstance(f, ArchivePart):
                lookup = (
                    esmatlas_metadata if isinstance(esmatlas_metadata, MetadataLookup) else None
                )
                with _metadata_batches(one, lookup) as each:
                    archive = _read_archive(f, each, rejects)
                counts |= {k: counts.get(k, 0) + v for k, v in archive.items()}
            else:
                one(f, Path(f))
        flush()
        writer.close(counts, rejects)
    return ShardResult(counts, rejects)


METADATA_BATCH = 512  # bundle members held (as bytes) per metadata lookup


@contextmanager
def _metadata_batches(one, lookup: MetadataLookup | None):  # type: ignore[no-untyped-def]
    """`one` for archive members, which with a lazy metadata lookup are held in batches of
    METADATA_BATCH and looked up in one scan before they are processed, in order."""
    if lookup is None:
        yield one
        return
    pending: list[tuple] = []

    def drain() -> None:
        lookup.need(file_stem(Path(name)) for _, name, _ in pending)
        for args in pending:
            one(*args)
        pending.clear()

    def each(source, name, data) -> None:  # type: ignore[no-untyped-def]
        pending.append((source, name, data))
        if len(pending) >= METADATA_BATCH:
            drain()

    yield each
    drain()  # the last batch (also what was read before a damaged part of an archive)


def _file_reject(path: str | Path, reason: str, detail: str) -> dict:
    return reject("structures", path, str(path).rsplit("/", 1)[-1], reason, detail)


def _read_archive(part: ArchivePart, one, rejects: list[dict]) -> dict:  # type: ignore[no-untyped-def]
    """Each structure member of an archive part through `one(source, name, bytes)`, one in
    memory at a time. Members that are not structure files (by name), and a truncated or
    corrupt archive, are reject rows; the members read before the damage are kept.
    Returns counts (members read, not structures)."""
    explicit = bool(part.members)
    stats = WalkStats(keep_skipped=10 if explicit else None)
    counts = {"members": 0, "members_skipped": 0, "archive_errors": 0}
    try:
        for m in iter_members(part.path, part.members or STRUCTURE_MEMBERS, part=part.part,
                              parts=part.parts, stats=stats):  # fmt: skip
            counts["members"] += 1
            one(m.source, Path(m.name), m.read())
    except ArchiveError as e:
        counts["archive_errors"] += 1
        member = f"{part.path}:{e.member}" if e.member else part.path
        rejects.append(reject("structures", member, e.member or Path(part.path).name,
                              "truncated_archive", str(e)))  # fmt: skip
    counts["members_skipped"] = stats.skipped if part.part == 0 else 0
    if not stats.selected and not counts["archive_errors"] and part.part == 0:
        globs = ", ".join(part.members or STRUCTURE_MEMBERS)
        rejects.append(reject("structures", part.path, Path(part.path).name, "no_structure_members",
                              f"no member matches {globs}; {stats.members} file(s) in the archive"))  # fmt: skip
    if not explicit and part.part == 0:  # every member of a bundle should be a structure
        rejects.extend(
            reject("structures", f"{part.path}:{n}", n.rsplit("/", 1)[-1], "not_a_structure",
                   f"archive member not named as a structure file ({', '.join(STRUCTURE_MEMBERS)})")
            for n in stats.skipped_names
        )  # fmt: skip
    return counts


def _process_file(
    path: Path,
    cfg: StructureStageConfig,
    esmatlas_metadata: Mapping[str, tuple[float, float]] | None,
    tokenizer: StructureTokenizer | None,
    dssp: Tool,
    times: StepTimes,
    *,
    data: bytes | None = None,
    source: str | None = None,
) -> tuple[list[dict], list[dict], int, bool]:
    """(rows, rejects, number of protein chains, whether the entry-level filter refused it)

    `data`: the file's bytes when they come from an archive member (`path` its name,
    `source` how rows and rejects name it)."""
    t0 = time.perf_counter()
    entry = read_structure(path, data=data, source=source)
    path = Path(source) if source else path  # rows and rejects name the input by this
    times.parse += time.perf_counter() - t0
    meta = entry.meta
    rejects: list[dict] = []
    n_chains = len(entry.chains)

    def chain_reject(chain: ParsedChain, reason: str, detail: str) -> None:
        rec = f"{meta.entry_id}_{chain.chain_id}"
        rejects.append(reject("structures", path, rec, reason, detail))

    t0 = time.perf_counter()
    if cfg.dataset == "pdb":
        why = check_pdb_entry(meta.method, meta.resolution, meta.deposition_date, cfg.pdb)
        if why:
            times.filter += time.perf_counter() - t0
            return [], [reject("structures", path, meta.entry_id, *why)], n_chains, True
    candidates: list[tuple[ParsedChain, np.ndarray | None, dict]] = []
    for chain in entry.chains:
        complete = chain.complete_backbone
        if not complete.any():
            chain_reject(chain, "no_backbone", "no residue has all of N, CA, C")
            continue
        if int(complete.sum()) < cfg.min_residues:
            chain_reject(chain, "too_short", f"{int(complete.sum())} < {cfg.min_residues}")
            continue
        plddt = None
        extra = {"mean_plddt": None, "ptm": None}
        if cfg.dataset != "pdb":
            plddt = normalize_plddt(chain.bfactor, cfg.plddt_scale)
            extra["mean_plddt"] = float(np.nanmean(plddt))
        if cfg.dataset == "afdb":
            why = check_afdb_chain(plddt, chain.backbone, cfg.afdb)
            if why:
                chain_reject(chain, *why)
                continue
        elif cfg.dataset == "esmatlas":
            mean_plddt, ptm = esmatlas_metadata.get(meta.entry_id, (None, None))
            why = check_esmatlas_chain(mean_plddt, ptm, cfg.esmatlas)
            if why:
                chain_reject(chain, *why)
                continue
            extra = {"mean_plddt": mean_plddt, "ptm": ptm}
        candidates.append((chain, plddt, extra))
    if cfg.dataset == "pdb" and cfg.pdb.one_chain_per_entity:
        candidates = _one_per_entity(candidates, chain_reject)
    times.filter += time.perf_counter() - t0

    sasa = [_chain_sasa(c[0], cfg, times) for c in candidates]
    ss8 = _file_ss8([c[0] for c, s in zip(candidates, sasa, strict=True)
                     if not isinstance(s, tuple)], cfg, dssp, times)  # fmt: skip
    rows = []
    for (chain, plddt, extra), chain_sasa in zip(candidates, sasa, strict=True):
        # rejects in chain order, as when each chain ran its steps in turn
        chain_ss8 = next(ss8) if not isinstance(chain_sasa, tuple) else None
        failed = next((f for f in (chain_sasa, chain_ss8) if isinstance(f, tuple)), None)
        if failed:
            chain_reject(chain, *failed)
            continue
        rows.append(
            _chain_row(
                entry, chain, path, cfg, plddt, extra, chain_sasa, chain_ss8, tokenizer, times
            )
        )
    return rows, rejects, n_chains, False


def _chain_sasa(
    chain: ParsedChain, cfg: StructureStageConfig, times: StepTimes
) -> np.ndarray | None | tuple[str, str]:
    """Per-residue SASA (None when not computed), or a (reason, detail) reject."""
    if not cfg.compute_sasa:
        return None
    t0 = time.perf_counter()
    try:
        return residue_sasa(chain.atoms, chain.complete_backbone, point_number=cfg.sasa_points)
    except Exception as e:  # noqa: BLE001 - biotite raises on unknown elements etc.
        return "sasa_failed", f"{type(e).__name__}: {e}"
    finally:
        times.sasa += time.perf_counter() - t0


def _file_ss8(
    chains: list[ParsedChain], cfg: StructureStageConfig, dssp: Tool, times: StepTimes
) -> Iterator[str | None | tuple[str, str]]:
    """Per chain its SS8 (None when not computed) or a (reason, detail) reject: one mkdssp
    call for all chains of the file."""
    if not cfg.ss8 or not chains:
        return iter([None] * len(chains))
    t0 = time.perf_counter()
    found = file_ss8([c.atoms for c in chains], tool=dssp)
    times.ss8 += time.perf_counter() - t0
    return iter(r if isinstance(r, str) else ("ss8_failed", str(r)[:2000]) for r in found)


def _one_per_entity(candidates, chain_reject):
    """Keep one chain per entity: the most residues with a backbone, then the first."""
    best: dict[str, tuple] = {}
    for c in candidates:
        chain = c[0]
        prev = best.get(chain.entity)
        if prev is None or chain.complete_backbone.sum() > prev[0].complete_backbone.sum():
            best[chain.entity] = c
    kept = []
    for c in candidates:
        keep = best[c[0].entity]
        if keep is c:
            kept.append(c)
        else:
            chain_reject(
                c[0], "same_entity", f"entity {c[0].entity} kept as chain {keep[0].chain_id}"
            )
    return kept


def _chain_row(
    entry: Entry,
    chain: ParsedChain,
    path: Path,
    cfg: StructureStageConfig,
    plddt: np.ndarray | None,
    extra: dict,
    sasa: np.ndarray | None,
    ss8: str | None,
    tokenizer: StructureTokenizer | None,
    times: StepTimes,
) -> dict:
    meta = entry.meta
    tokens = None
    if tokenizer is not None:
        t0 = time.perf_counter()
        tokens = tokenizer.encode(chain.backbone)
        times.tokens += time.perf_counter() - t0

    accession, positions = _accession(meta.entry_id, chain, cfg.dataset)
    many = len(entry.chains) > 1 or cfg.dataset == "pdb"
    return {
        "id": f"{meta.entry_id}_{chain.chain_id}" if many else meta.entry_id,
        "dataset": cfg.dataset,
        "source": str(path),
        "chain": chain.chain_id,
        "entity": chain.entity,
        "accession": accession,
        "sequence": chain.sequence,
        "coords": chain.backbone.reshape(-1),
        "plddt": plddt,
        "sasa": sasa,
        "ss8": ss8,
        "structure_tokens": tokens,
        "annotations": None,
        "method": meta.method,
        "resolution": meta.resolution,
        "deposition_date": meta.deposition_date,
        "mean_plddt": extra["mean_plddt"],
        "ptm": extra["ptm"],
        "_positions": positions,  # accession coordinate per residue; dropped before writing
    }


def _accession(entry_id: str, chain: ParsedChain, dataset: str):
    """(accession, positions): positions None means residue i is accession position i+1."""
    if dataset == "afdb":
        m = _AFDB_NAME.search(entry_id)
        if m:
            offset = AFDB_FRAGMENT_STEP * (int(m.group(2)) - 1)
            pos = None if offset == 0 else np.arange(1, len(chain) + 1, dtype=np.int32) + offset
            return m.group(1), pos
        return chain.accession, chain.uniprot_pos
    if dataset == "esmatlas":
        return entry_id, None
    return chain.accession, chain.uniprot_pos if chain.accession else None


def _attach(rows: list[dict], annotations) -> None:
    if not isinstance(annotations, Mapping):
        accs = {r["accession"] for r in rows if r["accession"]}
        annotations = load_annotations(annotations, accs)
    for r in rows:
        anns = annotations.get(r["accession"]) if r["accession"] else None
        if anns:
            r["annotations"] = map_annotations(anns, r["_positions"], len(r["sequence"])) or None


def _strip_private(rows: list[dict]) -> list[dict]:
    for r in rows:
        r.pop("_positions", None)
    return rows


# --- structure tokens ----------------------------------------------------------------------


def fit_structure_codebook(
    shard_paths: Iterable[str | Path],
    out_path: str | Path,
    codebook_size: int = 4096,
    max_residues: int = 2_000_000,
    iterations: int = 25,
    seed: int = 0,
) -> dict:
    """Learn a k-means structure codebook from the backbones of finished shards; save npz.

    Skips the work when `out_path` exists. Returns {chains, residues, codebook_size}.
    """
    out_path = Path(out_path)
    if out_path.exists():
        tok = KMeansStructureTokenizer.load(out_path)
        return {"codebook_size": tok.codebook_size, "skipped": True}
    backbones = ShardBackbones(shard_paths)
    tok = KMeansStructureTokenizer(codebook_size, iterations, max_residues, seed).fit(backbones)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(out_path)
    return {
        "chains": backbones.chains,
        "residues": backbones.residues,
        "codebook_size": codebook_size,
    }


class ShardBackbones:
    """The backbones of structure shards, (L, 3, 3) float32, streamed on every iteration.

    Reads only the `coords` column, `BACKBONE_BATCH_ROWS` chains at a time, so a consumer
    that does not keep them (the codebook fit) holds one batch, whatever the shards' size.
    After a full pass, `chains` and `residues` count what it read.
    """

    def __init__(self, shard_paths: Iterable[str | Path]) -> None:
        self.paths = list(shard_paths)
        self.chains = self.residues = 0

    def __iter__(self) -> Iterator[np.ndarray]:
        chains = residues = 0
        for path in self.paths:
            with streamed(path) as pf:
                for batch in pf.iter_batches(BACKBONE_BATCH_ROWS, columns=["coords"]):
                    for flat in batch.column(0).to_numpy(zero_copy_only=False):
                        bb = np.asarray(flat, dtype=np.float32).reshape(-1, 3, 3)
                        chains += 1
                        residues += len(bb)
                        yield bb
        self.chains, self.residues = chains, residues


def tokenize_structure_shard(
    in_path: str | Path, out_path: str | Path, tokenizer: StructureTokenizer | str | Path
) -> ShardResult:
    """Copy a structure shard with `structure_tokens` filled from the tokenizer."""
    out_path = Path(out_path)
    if out_path.exists():
        return stored_result(out_path)
    if not isinstance(tokenizer, StructureTokenizer):
        from esm3.model.vqvae.tokenizer import load_structure_tokenizer

        tokenizer = load_structure_tokenizer(tokenizer)
    rows = read_shard(in_path)
    for r in rows:
        bb = np.asarray(r["coords"], dtype=np.float32).reshape(-1, 3, 3)
        r["structure_tokens"] = tokenizer.encode(bb)
    counts = {
        "chains": len(rows),
        "residues": int(sum(len(r["sequence"]) for r in rows)),
        "tokens": int(sum(int((r["structure_tokens"] >= 0).sum()) for r in rows)),
    }
    write_shard(rows, out_path, counts, [])
    return ShardResult(counts, [])


# --- Table S3 ------------------------------------------------------------------------------


def structure_dataset_stats(
    shard_paths: Iterable[str | Path],
    dataset: str,
    release: str,
    *,
    clusters: Source | Mapping[str, str] | None = None,
    clustering_level: float | None = None,
    expansion: Source | Mapping[str, str] | None = None,
    expansion_level: float | None = None,
    run_id: str | None = None,
) -> dict:
    """One `dataset_stats` row (Table S3) for a structure dataset from its shards.

    tokens = chains x average length (the paper's definition). `clusters` and `expansion`
    are the sequence pipeline's mmseqs clusterings of the chains (Parquet path(s) or a table
    of representative, member; or a mapping member -> representative); their counts are
    the numbers of distinct representatives among the dataset's chains. DuckDB aggregates:
    nothing per chain is held in memory.
    """
    shards = [str(p) for p in shard_paths]
    con = connect()
    try:
        n, total = 0, 0
        if shards:
            duckdb_source(con, "chains", shards)
            n, total = con.sql(
                "SELECT count(*), coalesce(sum(length(sequence)), 0) FROM chains"
            ).fetchall()[0]

        def count(clustering) -> int | None:
            if clustering is None:
                return None
            if not shards:
                return 0
            if isinstance(clustering, Mapping):
                clustering = pa.table(
                    {"member": list(clustering), "representative": list(clustering.values())}
                )
            duckdb_source(con, "clustering", clustering)
            return con.sql(
                """SELECT count(DISTINCT c.representative) FROM clustering c
                   SEMI JOIN chains s ON c.member = s.id"""
            ).fetchall()[0][0]

        clustering_count, expansion_count = count(clusters), count(expansion)
    finally:
        con.close()
    avg = total / n if n else 0.0
    return {
        "run_id": run_id,
        "dataset": dataset,
        "type": "structure",
        "clustering_level": clustering_level,
        "clustering_count": clustering_count,
        "expansion_level": expansion_level,
        "expansion_count": expansion_count,
        "sequences": n,
        "avg_length": avg,
        "tokens": int(round(n * avg)),
        "release": release,
        "computed_at": datetime.now(UTC),
    }
