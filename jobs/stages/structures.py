"""The structure pipeline: interpro -> (derive) -> structures -> cluster -> expand -> stats,
and structures -> codebook -> tokenize.

Array tasks (module-level, run in the job process):
- interpro:        one task per protein2ipr / InterProScan file -> Parquet; rejects
- interpro-vocab:  one task: the vocabulary file (function token tables, residue labels)
- derive:          demo only, one task per dataset marked `proxy_from_experimental`
- structures:      one task per `shard_size` files, or per part of a tar bundle (`split` parts
                   each, read in place): parse, filter, SASA, SS8, annotations
- structure-cluster / structure-expand: the sequence pipeline's mmseqs and expansion tasks
  on the chains' sequences
- codebook:        one task: fit the structure codebook on every structure shard
- tokenize:        one task per structure shard: structure tokens per residue
- structure-stats: one task: Table S3 rows (PDB, PDB clustered, AFDB, ESMAtlas) and S4
"""

from __future__ import annotations

import csv
import json
import re
import shutil
from collections.abc import Sequence
from dataclasses import astuple, dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from esm3.data.archives import ArchivePart, is_archive
from esm3.data.function_keywords import build_function_tokenizer
from esm3.data.interpro import (
    SITE_SCHEMA,
    frequent_labels,
    ingest_interproscan,
    ingest_protein2ipr,
    ingest_sites,
    interpro_vocabulary,
    site_description_counts,
)
from esm3.data.inventory import read_paths
from esm3.data.shards import write_table
from esm3.data.structures.io import StructureReadError, read_structure
from esm3.data.structures.stages import (
    StructureStageConfig,
    fit_structure_codebook,
    process_structure_shard,
    structure_dataset_stats,
    tokenize_structure_shard,
)
from esm3.data.token_stats import cluster_table, token_stats_row
from esm3.tokenize.annotations import vocabulary_document
from esm3.tokenize.function_tokens import OUR_NAMES, FunctionFiles, FunctionTokenizer
from esm3.tokenize.residue_table import read_residue_table, site_aliases
from jobs.arrays import IndexedItems, JoinedItems
from jobs.errors import UserError
from jobs.stages.config import DatasetConfig, Inputs, PreprocessConfig
from jobs.stages.inventory import Listing
from jobs.stages.runner import (
    Layout,
    Stage,
    output_key,
    record_rejects,
    record_stats,
    say,
    stage_resources,
    write_text_atomic,
)
from jobs.stages.sequences import cluster_task, expand_task, token_budgets

_SIGNALLED = re.compile(r"exit code -\d+")

# --- tasks ---------------------------------------------------------------------------------


_INGEST = {"protein2ipr": ingest_protein2ipr, "interproscan": ingest_interproscan,
           "sites": ingest_sites}  # fmt: skip


def interpro_task(ws: str, run_id: str, src: str, out: str, kind: str) -> dict:
    summary, rejects = _INGEST[kind](src, out)
    record_rejects(ws, run_id, output_key(ws, out), rejects)
    say("interpro", f"{src}: {summary.get('rows')} rows, {summary.get('malformed')} malformed")
    return summary


def vocabulary_task(
    ws: str,
    run_id: str,
    paths: list[str],
    out: str,
    sites: list[str] | None = None,
    vocabulary: str | None = None,
    min_site_proteins: int = 1,
    note: str = "",
    function_source: dict[str, str] | None = None,
    min_keyword_entries: int = 1,
    seed: int = 0,
    residue_table: str = "",
) -> dict:
    """The InterPro terms table (`out`) and the vocabulary file training reads
    (`vocabulary`): the function token tables (written to function-tokens/ beside it, from
    `function_source`, see `function_tables`) and the residue labels: the site labels
    carried by at least `min_site_proteins` distinct proteins, or with esm's
    `residue_table` its labels in esm's order and each site label's alias (see
    `residue_labels`)."""
    if paths and not Path(out).exists():
        write_table(interpro_vocabulary(paths), out)
    residue, aliases, counts = residue_labels(sites or [], min_site_proteins, residue_table)
    tables = "no function token tables"
    if vocabulary:
        folder = Path(vocabulary).parent
        files = function_tables(function_source or {}, folder / FUNCTION_TABLES,
                                min_keyword_entries, seed)  # fmt: skip
        table = {"residue_table": residue_table} if residue_table else {}
        doc = vocabulary_document(
            files.relative_to(folder) if files else None, residue, aliases, note=note,
            min_site_proteins=min_site_proteins, function_source=function_source or None,
            sources=sorted(paths + (sites or [])), **table,
        )  # fmt: skip
        write_text_atomic(Path(vocabulary), json.dumps(doc, indent=1))
        tables = f"function token tables in {files.keywords.parent}" if files else tables
    say("interpro-vocab", f"{tables}, {len(residue)} residue labels -> {vocabulary or out}")
    return {"residue_labels": len(residue), "function_tables": tables, **counts}


def residue_labels(
    sites: list[str], min_site_proteins: int, residue_table: str = ""
) -> tuple[list[str], dict[str, str], dict]:
    """(labels, aliases, summary counts) of the residue track. Without a table: the site
    labels of at least `min_site_proteins` proteins, no aliases. With esm's table: its clean
    labels in esm's order (token ids equal the released model's) and site label -> clean
    label through the site's description, the text esm's table is keyed by; the counts say
    how many site rows have a description outside the table (<unk>, as in esm)."""
    if not residue_table:
        return frequent_labels(sites, "label", SITE_SCHEMA, min_site_proteins), {}, {}
    table = read_residue_table(residue_table)
    found = site_aliases(site_description_counts(sites), table)
    if found.rows and not found.aliases:  # every site <unk>: the wrong table or site files
        raise ValueError(f"residue table {residue_table}: none of the {found.rows} site rows "
                         f"of {len(sites)} site files has a description in its label column")  # fmt: skip
    counts = {"residue_aliases": len(found.aliases), "site_rows": found.rows,
              "site_rows_unknown": found.unknown_rows}  # fmt: skip
    say("interpro-vocab", f"{found.unknown_rows} of {found.rows} site rows have a description "
                          f"outside {residue_table} (<unk>)")  # fmt: skip
    return list(table.labels), found.aliases, counts


FUNCTION_TABLES = "function-tokens"  # the folder beside vocabulary.json


def function_tables(
    source: dict[str, str], folder: Path, min_keyword_entries: int = 1, seed: int = 0
) -> FunctionFiles | None:
    """The function token tables written to `folder` (None without a source): esm's files
    (`function_files`) checked by loading them and copied byte for byte under our names, or
    tables built from InterPro's `entry_list` (+ `interpro2go`, `go_obo`)."""
    if "function_files" in source:
        given = FunctionFiles.in_folder(source["function_files"])
        FunctionTokenizer.from_files(given)  # one clear error now, not in training
        folder.mkdir(parents=True, exist_ok=True)
        files = FunctionFiles(*(folder / name for name in OUR_NAMES))
        for src, dst in zip(astuple(given), astuple(files), strict=True):
            shutil.copyfile(src, dst)
        return files
    if "entry_list" in source:
        tok = build_function_tokenizer(source["entry_list"], source.get("interpro2go"),
                                       source.get("go_obo"), min_entries=min_keyword_entries,
                                       seed=seed)  # fmt: skip
        return tok.write(folder)
    return None


def _proxy_plddt(bfactor: np.ndarray) -> np.ndarray:
    """A confidence proxy on 0-100 from B-factors (NOT a prediction): the least mobile
    residue of the chain gets 95, the most mobile 45, linearly in between."""
    b = np.asarray(bfactor, dtype=np.float64)
    lo, hi = np.nanmin(b, initial=np.inf), np.nanmax(b, initial=-np.inf)
    rel = np.zeros_like(b) if not hi > lo else (b - lo) / (hi - lo)
    return np.where(np.isnan(rel), 45.0, 95.0 - 50.0 * rel)


def derive_task(
    ws: str, run_id: str, files: list[str], out_dir: str, metadata_out: str | None
) -> dict:
    """Demo inputs for AFDB/ESMAtlas from experimental structures, said plainly: the protein
    chains of model 1 written as PDB with a B-factor-derived confidence proxy in the B-factor
    column (as AFDB and ESMFold store pLDDT); for ESMAtlas also a metadata table whose
    plddt and ptm are the proxy's mean. Files that cannot be read are copied as they are,
    so the structures stage rejects them with its own reason."""
    import shutil

    import biotite.structure as bs
    import biotite.structure.io.pdb as pdb

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta_rows = []
    for f in files:
        dst = out / derived_name(Path(f))
        try:
            entry = read_structure(f)
        except StructureReadError:
            if not dst.exists():
                shutil.copyfile(f, dst.with_name(f".{dst.name}.tmp"))
                dst.with_name(f".{dst.name}.tmp").replace(dst)
            continue
        chains = []
        for ch in entry.chains:
            atoms = ch.atoms.copy()
            res = bs.get_residue_positions(atoms, np.arange(atoms.array_length()))
            atoms.b_factor = _proxy_plddt(ch.bfactor)[res].astype(np.float32)
            chains.append(atoms)
        mean = float(np.mean(np.concatenate([c.b_factor for c in chains]))) / 100.0
        meta_rows.append({"id": dst.name.removesuffix(".pdb"), "plddt": mean, "ptm": mean})
        if not dst.exists():
            pf = pdb.PDBFile()
            pf.set_structure(bs.concatenate(chains) if len(chains) > 1 else chains[0])
            tmp = dst.with_name(f".{dst.name}.tmp")
            pf.write(str(tmp))
            tmp.replace(dst)
    if metadata_out and not Path(metadata_out).exists():
        tmp = Path(metadata_out).with_name(f".{Path(metadata_out).name}.tmp")
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, ["id", "plddt", "ptm"])
            w.writeheader()
            w.writerows(meta_rows)
        tmp.replace(metadata_out)
    say("derive", f"{len(files)} file(s) -> {out_dir} (B-factor confidence proxy, not pLDDT)")
    return {"files": len(files), "entries": len(meta_rows)}


def derived_name(src: Path) -> str:
    name = src.name
    for ext in (".gz", ".bz2", ".cif", ".mmcif", ".bcif", ".pdb", ".ent"):
        name = name.removesuffix(ext)
    return f"{name}.pdb"


def structure_task(
    ws: str,
    run_id: str,
    files: list,  # paths, ArchiveParts, or inventory references (`task_inputs`)
    out: str,
    config: StructureStageConfig,
    metadata: str | None,
    annotations: list[str] | None,
) -> dict:
    files = task_inputs(files)  # inventory rows read here, in the job

    def run():  # type: ignore[no-untyped-def]
        return process_structure_shard(
            files, out, config, esmatlas_metadata=metadata, annotations=annotations or None
        )

    res = run()
    if _killed_tool(res.rejects) and res.summary.get("skipped"):
        Path(out).unlink()  # stored by an earlier version that kept such shards: redo it
        res = run()
    killed = _killed_tool(res.rejects)
    if killed:
        # the library records a failed mkdssp as a data reject; one killed by a signal
        # (scancel sends SIGTERM, which submitit lets the job survive) is the job's failure
        Path(out).unlink(missing_ok=True)
        raise RuntimeError(
            f"{out}: removed, {killed[0]['record']}: a tool was killed by a signal, not a data "
            f"problem ({killed[0]['detail'].splitlines()[0]}); a re-run redoes this shard"
        )
    record_rejects(ws, run_id, output_key(ws, out), res.rejects)
    s = res.summary
    say("structures", f"{out}: {s.get('files')} files, {s.get('chains_kept')} chains kept, "
        f"{len(res.rejects)} rejected{' (already done)' if s.get('skipped') else ''}")  # fmt: skip
    return {**s, "rejected": len(res.rejects)}


def _killed_tool(rejects: list[dict]) -> list[dict]:
    """Rejects whose external tool died from a signal (negative exit code)."""
    return [
        r
        for r in rejects
        if r["reason"] in ("ss8_failed", "sasa_failed") and _SIGNALLED.search(r["detail"])
    ]


def codebook_task(
    ws: str, run_id: str, shards: list[str], out: str, size: int, max_residues: int,
    iterations: int, seed: int,
) -> dict:  # fmt: skip
    summary = fit_structure_codebook(list(shards), out, size, max_residues, iterations, seed)
    say("codebook", f"{summary} -> {out}")
    return summary


def export_encoder_task(ws: str, run_id: str, checkpoint: str, out: str) -> dict:
    """The trained VQ-VAE's encoder, from its checkpoint (or an encoder file, e.g. written
    by `esm3 convert encoder-from-esm`) into the workspace's tokenizer file."""
    from esm3.model.vqvae.tokenizer import VQVAEStructureTokenizer, identity
    from esm3.train import checkpoint as ckpt
    from esm3.train.vqvae import load_vqvae

    # the exact step folder (a run's folder means its newest checkpoint: name which one)
    path = Path(checkpoint)
    target, source = Path(out), str((path if path.is_file() else ckpt.resolve(path)).resolve())
    if target.exists():
        made = identity(target)
        if made["source"] != source:
            raise UserError(
                f"{target} holds the encoder of {made['source']}, not of {source}: remove it "
                f"and the structures' tokens-vqvae folders to tokenize with the new one"
            )
        say("codebook", f"structure encoder of {source} already at {target}")
        return {**made, "skipped": True}
    if Path(checkpoint).is_file():
        encoder = VQVAEStructureTokenizer.load(checkpoint).encoder
    else:
        encoder = load_vqvae(checkpoint).encoder
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".part")
    VQVAEStructureTokenizer(encoder, source).save(tmp)
    tmp.replace(target)
    made = identity(target)
    say("codebook", f"structure encoder ({made['codebook_size']} codes) of {source} -> {target}")
    return made


def tokenize_task(ws: str, run_id: str, src: str, out: str, codebook: str) -> dict:
    res = tokenize_structure_shard(src, out, codebook)
    say("tokenize", f"{src} -> {out}: {res.summary}")
    return res.summary


def structure_stats_task(ws: str, run_id: str, specs: list[dict]) -> dict:
    """Table S3 rows per structure dataset (and `<name>` unclustered + `<name>_clustered`
    when asked, as the paper lists PDB), and a Table S4 row from the expanded clusters;
    keyed by the expanded clusters file, so a re-run replaces them."""
    s3_rows, s4_rows = [], []
    for sp in specs:
        name, levels, shards = sp["dataset"], sp["levels"], list(sp["shards"])
        first = len(s3_rows)
        if sp["also_unclustered"]:
            s3_rows.append(structure_dataset_stats(shards, name, sp["release"]))
        low = sp["level_files"][0]
        high = sp["level_files"][1] if len(levels) > 1 else None
        s3_rows.append(
            structure_dataset_stats(
                shards,
                f"{name}_clustered" if sp["also_unclustered"] else name,
                sp["release"],
                clusters=low,
                clustering_level=levels[0],
                expansion=high,
                expansion_level=levels[1] if len(levels) > 1 else None,
            )
        )
        if pq.read_metadata(sp["expanded"]).num_rows:
            ct = cluster_table(sp["expanded"], shards)
            s4 = token_stats_row(dataset=name, type="structure", n=ct["n"], tokens=ct["tokens"],
                                 token_budget=sp["token_budget"])  # fmt: skip
        else:
            s4 = dict(dataset=name, type="structure", token_budget=sp["token_budget"],
                      repeats=0.0, unique_samples=0.0, unique_tokens=0.0)  # fmt: skip
        s4_rows.append(s4)
        for r in s3_rows[first:]:
            r.pop("run_id", None)
        record_stats(ws, run_id, output_key(ws, sp["expanded"]), "dataset_stats", s3_rows[first:])
        record_stats(ws, run_id, output_key(ws, sp["expanded"]), "token_stats", [s4])
        say("structure-stats", f"{name}: {s3_rows[-1]['sequences']} chains, "
            f"{s3_rows[-1]['clustering_count']} clusters at {levels[0]:g}")  # fmt: skip
    plain = [{k: v for k, v in r.items() if k not in ("computed_at", "run_id")} for r in s3_rows]
    return {"dataset_stats": plain, "token_stats": [
        {k: v for k, v in r.items() if k not in ("computed_at", "run_id")} for r in s4_rows]}  # fmt: skip


# --- plan ----------------------------------------------------------------------------------


def stage_config(cfg: PreprocessConfig, d: DatasetConfig) -> StructureStageConfig:
    o = cfg.structures
    return StructureStageConfig(
        dataset=d.format,
        pdb=replace(o.pdb, methods=tuple(o.pdb.methods)),
        afdb=o.afdb,
        esmatlas=o.esmatlas,
        sasa=d.format in o.sasa,
        ss8=d.format in o.ss8,
        plddt_scale=d.plddt_scale,
        min_residues=o.min_residues,
        sasa_points=o.sasa_points,
    )


@dataclass(frozen=True)
class InventorySlice:
    """Rows [start, stop) of an inventory file: a structure task's plain files, read in
    the job."""

    inventory: str
    start: int
    stop: int

    def paths(self) -> list[str]:
        return read_paths(self.inventory, self.start, self.stop)


@dataclass(frozen=True)
class ArchiveRow:
    """Part `part` of `parts` of the tar bundle in row `row` of an archive inventory."""

    inventory: str
    row: int
    part: int
    parts: int
    members: tuple[str, ...]

    def resolve(self) -> ArchivePart:
        (path,) = read_paths(self.inventory, self.row, self.row + 1)
        return ArchivePart(path, self.part, self.parts, self.members)


def task_inputs(files: list) -> list:
    """A structure task's inputs, inventory references read: paths and `ArchivePart`s."""
    out: list = []
    for f in files:
        if isinstance(f, InventorySlice):
            out += f.paths()
        else:
            out.append(f.resolve() if isinstance(f, ArchiveRow) else f)
    return out


@dataclass(frozen=True)
class ShardPaths(Sequence):
    """The paths <folder>/<i:05d>.parquet, i < n, of each (folder, n) group in turn: a
    stage's list of shards that pickles as a few numbers (hundreds of thousands of shards
    at AFDB's size), listed where it is used."""

    groups: tuple[tuple[str, int], ...] = ()

    def __len__(self) -> int:
        return sum(n for _, n in self.groups)

    @staticmethod
    def name(folder: str, k: int) -> str:
        return str(Path(folder) / f"{k:05d}.parquet")

    def __getitem__(self, i):  # type: ignore[no-untyped-def]
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        k = i + len(self) if i < 0 else i
        for folder, n in self.groups:
            if 0 <= k < n:
                return self.name(folder, k)
            k -= n
        raise IndexError(i)

    def __iter__(self):  # type: ignore[no-untyped-def]
        for folder, n in self.groups:
            for k in range(n):
                yield self.name(folder, k)

    def __add__(self, other: ShardPaths) -> ShardPaths:
        return ShardPaths(self.groups + other.groups)

    def under(self, folder: str | Path) -> ShardPaths:
        """The same names in another folder (tokens beside shards)."""
        return ShardPaths(tuple((str(folder), n) for _, n in self.groups))


@dataclass(frozen=True)
class StructureShards:
    """The shards of one structure dataset: plain files `shard_size` at a time, then each
    tar bundle in `split` parts (task k reads the bundle's members k, k + split, ...). The
    inputs are a listing's inventory rows, or a list the driver made (demo proxies);
    shard i is written to `folder`/<i>.parquet."""

    folder: str
    shard_size: int
    split: int
    members: tuple[str, ...]
    n_files: int
    n_archives: int
    listing: Listing | None = None
    files: tuple[str, ...] = ()  # without a listing
    archives: tuple[str, ...] = ()

    @property
    def n_file_shards(self) -> int:
        return -(-self.n_files // self.shard_size)

    def __len__(self) -> int:
        return self.n_file_shards + self.n_archives * self.split

    def inputs(self, i: int) -> list:
        if i < self.n_file_shards:
            lo, hi = i * self.shard_size, min(self.n_files, (i + 1) * self.shard_size)
            if self.listing is None:
                return list(self.files[lo:hi])
            return [InventorySlice(self.listing.files, lo, hi)]
        row, part = divmod(i - self.n_file_shards, self.split)
        if self.listing is None:
            return [ArchivePart(self.archives[row], part, self.split, self.members)]
        return [ArchiveRow(self.listing.archives, row, part, self.split, self.members)]

    def out(self, i: int) -> str:
        return ShardPaths.name(self.folder, i)

    def paths(self) -> ShardPaths:
        return ShardPaths(((self.folder, len(self)),))


def structure_shards(d: DatasetConfig, inputs: Inputs, lay: Layout) -> StructureShards:
    """The shards of one structure dataset, from its listing (or, for demo proxies, the
    derived files of its resolved inputs)."""
    folder = str(lay.struct(d.name) / "shards")
    common = dict(folder=folder, shard_size=d.shard_size, split=d.split, members=tuple(d.members))
    listing = inputs.listings.get(d.name)
    if listing is not None:
        return StructureShards(**common, n_files=listing.n_files, n_archives=listing.n_archives,
                               listing=listing)  # fmt: skip
    files = inputs.datasets[d.name]
    if d.proxy_from_experimental:
        files = [lay.struct(d.name) / "derived" / derived_name(f) for f in files]
    plain = tuple(str(f) for f in files if not is_archive(f))
    bundles = tuple(str(f) for f in files if is_archive(f))
    return StructureShards(**common, n_files=len(plain), n_archives=len(bundles), files=plain,
                           archives=bundles)  # fmt: skip


@dataclass(frozen=True)
class ShardItem:
    """Item i of a stage over a dataset's shards: `head` + (inputs or shard, output) + `tail`."""

    shards: StructureShards
    head: tuple
    tail: tuple
    out_folder: str = ""  # tokenize: shard i -> out_folder/<name of shard i>

    def __call__(self, i: int) -> tuple:
        if self.out_folder:
            shard = self.shards.out(i)
            return (*self.head, shard, str(Path(self.out_folder) / Path(shard).name), *self.tail)
        return (*self.head, self.shards.inputs(i), self.shards.out(i), *self.tail)


def plan_interpro(ws: Path, run_id: str, cfg: PreprocessConfig, inputs: Inputs, lay: Layout):
    """(stages, ingested InterPro Parquet paths, ingested site Parquet paths) of the label
    ingest and the vocabulary file."""
    w = str(ws)
    items = [(w, run_id, str(f), str(lay.interpro / f"{kind}-{i:05d}.parquet"), kind)
             for kind, files in (("protein2ipr", inputs.protein2ipr),
                                 ("interproscan", inputs.interproscan), ("sites", inputs.sites))
             for i, f in enumerate(files)]  # fmt: skip
    paths = [it[3] for it in items if it[4] != "sites"]
    sites = [it[3] for it in items if it[4] == "sites"]
    ic = cfg.interpro
    vocab = [(w, run_id, paths, str(lay.interpro / "vocabulary.parquet"), sites,
              str(lay.vocabulary), ic.min_site_proteins, ic.note, inputs.function_source,
              ic.min_keyword_entries, cfg.seed, inputs.residue_table)] if items else []  # fmt: skip
    stages = [
        Stage("interpro", interpro_task, items, [], stage_resources(cfg, "interpro")),
        Stage("interpro-vocab", vocabulary_task, vocab, ["interpro"], None),
    ]
    return stages, paths, sites


def plan_structures(
    ws: Path,
    run_id: str,
    cfg: PreprocessConfig,
    inputs: Inputs,
    lay: Layout,
    *,
    process: bool = True,
    tokens: bool = False,
    annotations: list[str] | None = None,
) -> list[Stage]:
    """Stages for the structure datasets: `process` (parse ... stats), `tokens` (codebook,
    tokenize). Tokens alone need the structure shards of an earlier run. `annotations`:
    the ingested InterPro tables when the caller plans the InterPro stages; None: planned
    here with the structure stages."""
    w = str(ws)
    datasets = [d for d in cfg.of_type("structure") if planned(d, inputs)]
    stages: list[Stage] = []
    ann_paths: list[str] = list(annotations or [])
    if process and annotations is None:
        stages, ann_paths, _ = plan_interpro(ws, run_id, cfg, inputs, lay)
    derive, struct, clus, expand, specs, tok = [], [], [], [], [], []
    all_shards = ShardPaths()
    budgets = token_budgets(cfg)
    for d in datasets:
        metadata = str(inputs.metadata[d.name]) if inputs.metadata.get(d.name) else None
        listing = inputs.listings.get(d.name)
        if listing is not None and listing.metadata:  # the `list` stage's sorted Parquet copy
            metadata = listing.metadata
        if d.proxy_from_experimental:
            meta_out = lay.struct(d.name) / "derived-metadata.csv"
            if d.format == "esmatlas":
                metadata = str(meta_out)
            derive.append((w, run_id, [str(f) for f in inputs.datasets[d.name]],
                           str(lay.struct(d.name) / "derived"),
                           metadata if d.format == "esmatlas" else None))  # fmt: skip
        shards = structure_shards(d, inputs, lay)
        scfg = stage_config(cfg, d)
        # made by each task from its index: the driver lists no file of the dataset
        struct.append(
            IndexedItems(
                len(shards), ShardItem(shards, (w, run_id), (scfg, metadata, ann_paths or None))
            )
        )
        tok.append(
            IndexedItems(
                len(shards),
                ShardItem(
                    shards, (w, run_id), (str(lay.tokenizer(cfg.codebook.kind)),),
                    str(lay.tokens_dir(d.name, cfg.codebook.kind)),
                ),
            )
        )
        paths = shards.paths()
        all_shards = all_shards + paths
        levels = [str(lay.level_file(d.name, lv)) for lv in d.levels]
        clus.append((w, run_id, paths, levels, list(d.levels)))
        expand.append((w, run_id, levels[0], levels[1] if len(levels) > 1 else None,
                       str(lay.expanded_file(d.name)), d.cap, cfg.seed))  # fmt: skip
        specs.append(dict(dataset=d.name, shards=paths, levels=list(d.levels), level_files=levels,
                          expanded=str(lay.expanded_file(d.name)), release=d.release,
                          also_unclustered=d.also_unclustered,
                          token_budget=budgets[d.name]))  # fmt: skip
    if tokens and not process:
        missing = [p for p in all_shards if not Path(p).exists()]
        if missing:
            raise UserError(f"structure tokens need the structure shards first; {len(missing)} "
                            f"missing, e.g. {missing[0]} (run `esm3 preprocess structures`)")  # fmt: skip

    def st(name, fn, items, after):
        return Stage(name, fn, items, after, stage_resources(cfg, name))

    if process:
        stages += [
            st("derive", derive_task, derive, []),
            st("structures", structure_task, JoinedItems(tuple(struct)), ["derive", "interpro"]),
            st("structure-cluster", cluster_task, clus, ["structures"]),
            st("structure-expand", expand_task, expand, ["structure-cluster"]),
            st(
                "structure-stats",
                structure_stats_task,
                [(w, run_id, specs)] if specs else [],
                ["structure-expand"],
            ),  # fmt: skip
        ]
    if tokens and all_shards and cfg.codebook.vqvae:
        stages += [
            st("codebook", export_encoder_task,
               [(w, run_id, cfg.codebook.vqvae, str(lay.encoder))], ["structures"]),
            st("tokenize", tokenize_task, JoinedItems(tuple(tok)), ["codebook"]),
        ]  # fmt: skip
    elif tokens and all_shards:
        c = cfg.codebook
        stages += [
            st(
                "codebook",
                codebook_task,
                [
                    (
                        w,
                        run_id,
                        all_shards,
                        str(lay.codebook),
                        c.size,
                        c.max_residues,
                        c.iterations,
                        cfg.seed,
                    )
                ],
                ["structures"],
            ),  # fmt: skip
            st("tokenize", tokenize_task, JoinedItems(tuple(tok)), ["codebook"]),
        ]
    return stages


def planned(d: DatasetConfig, inputs: Inputs) -> bool:
    """A structure dataset whose inputs are known: resolved, or listed by the `list` stage."""
    return d.name in inputs.datasets or d.name in inputs.listings


def structure_outputs(cfg: PreprocessConfig, inputs: Inputs, lay: Layout, tokens: bool) -> dict:
    out = {}
    for d in cfg.of_type("structure"):
        if not planned(d, inputs):
            continue
        shards = structure_shards(d, inputs, lay)
        sub = lay.tokens_dir(d.name, cfg.codebook.kind) if tokens else lay.struct(d.name) / "shards"
        out[d.name] = {
            "type": "structure",
            "format": d.format,
            "shards": shards.paths().under(sub),
            "clusters": str(lay.expanded_file(d.name)),
            "weight": d.weight,
        }
    return out
