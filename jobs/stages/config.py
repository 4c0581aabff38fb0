"""The preprocessing config (TOML -> dataclasses) and the check of its inputs.

Defaults are the paper's (appendix A.2.1): clustering at 70% with a 90% expansion level
for UniRef, MGnify, AFDB and ESMAtlas, 70% only for JGI, 95% only for OAS; 25,000
validation proteins per dataset purged at 70% identity; clusters capped at 20 members;
SASA on AFDB and ESMAtlas, SS8 on PDB, AFDB and ESMAtlas (Table S5); 4096 structure codes.

Input paths may be files or globs, and may start with `{workspace}` (the workspace root)
or `{package:NAME}` (the folder of an installed Python package, e.g. MDAnalysisTests).
`check_inputs` checks them before anything is recorded or submitted (that each pattern
matches a file of the right kind; the `list` stage walks them); a path that matches
nothing is one `ConfigError` line naming the dataset and the path.

Formats, as the databases publish them: `fasta` (plain or .gz, or tar archives of FASTA
members such as JGI/IMG's one `<taxon_oid>.tar.gz` per genome), `oas` (OAS data units,
`.csv.gz`, unpaired or paired; `esm3.data.oas`), and for structures `pdb`/`afdb`/`esmatlas`
files or tar bundles of them (AFDB's `.tar`, the ESM Atlas's `.tar.gz`), read in place
(`esm3.data.archives`).
"""

from __future__ import annotations

import glob
import importlib.util
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from esm3.data.archives import is_archive
from esm3.data.fasta import HeaderFormat
from esm3.data.structures.filters import AFDBFilter, ESMAtlasFilter, PDBFilter
from esm3.tokenize.function_tokens import FunctionFiles
from esm3.tokenize.residue_table import read_residue_table
from jobs.config import ConfigError, load

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "preprocess"
DEFAULT_CONFIG = CONFIG_DIR / "demo.toml"

SEQUENCE_FORMATS = ("fasta", "oas")
STRUCTURE_FORMATS = ("pdb", "afdb", "esmatlas")
STAGES = (
    "list",
    "split",
    "ingest",
    "cluster",
    "expand",
    "validation",
    "purge",
    "sequence-stats",
    "derive",
    "structures",
    "codebook",
    "tokenize",
    "structure-cluster",
    "structure-expand",
    "structure-stats",
    "interpro",
    "interpro-vocab",
    "annotate",
    "store",
)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass
class DatasetConfig:
    """One source dataset (a row of Table S3)."""

    name: str
    type: Literal["sequence", "structure"]
    paths: list[str]  # files or globs; `{workspace}/...`, `{package:NAME}/...` allowed
    # sequence: fasta (plain, .gz, or tar archives of FASTA files) | oas (OAS data units,
    # .csv.gz); structure: pdb | afdb | esmatlas (mmCIF/PDB/BinaryCIF files, or tar bundles)
    format: Literal["fasta", "oas", "pdb", "afdb", "esmatlas"] = "fasta"
    header: HeaderFormat = "auto"  # FASTA header convention (see esm3.data.fasta)
    # archives: globs of the member names to read (default: *.faa, *.fasta (.gz) for FASTA;
    # every structure file for structures, where other members are rejects)
    members: list[str] = field(default_factory=list)
    # clustering level, then the optional expansion level (fractions of identity)
    levels: list[float] = field(default_factory=lambda: [0.7, 0.9])
    release: str = ""
    # plain FASTA: input shards (array tasks) each input file is split into; structure tar
    # bundles: array tasks that share each bundle (task k reads members k, k + split, ...)
    split: int = 1
    shard_size: int = 100  # structure: files per array task (plain files, not bundles)
    weight: float = 1.0  # mixing weight: this dataset's share of the token budget
    purge: bool = True  # sequence: sample validation from it and purge its training set
    cap: int = 20  # members per cluster after expansion
    lowercase: Literal["upper", "reject"] = "upper"
    # esmatlas (required): table of id, plddt, ptm (Parquet or CSV/TSV); afdb (optional):
    # id, plddt (the global pLDDT); the `list` stage drops entries below the thresholds
    metadata: str = ""
    plddt_scale: Literal["auto", "0-1", "0-100"] = "auto"
    also_unclustered: bool = False  # structure: a Table S3 row without clustering too (PDB)
    # demo only: inputs are experimental structures standing in for predictions; a derive
    # job writes a confidence proxy (from B-factors, not a prediction) into the B-factor
    # column, and for ESMAtlas a metadata table with proxy pLDDT and pTM
    proxy_from_experimental: bool = False

    def validate(self) -> None:
        where = f"dataset '{self.name}'"
        if not _NAME.match(self.name):
            raise ConfigError(f"{where}: name must be letters, digits, '.', '_' or '-'")
        allowed = SEQUENCE_FORMATS if self.type == "sequence" else STRUCTURE_FORMATS
        if self.format not in allowed:
            raise ConfigError(
                f"{where}: format {self.format!r} is not one of {list(allowed)} "
                f"for a {self.type} dataset"
            )
        if not self.paths:
            raise ConfigError(f"{where}: 'paths' is empty (files or globs of the inputs)")
        if not 1 <= len(self.levels) <= 2:
            raise ConfigError(
                f"{where}: 'levels' {self.levels} must be [clustering] or [clustering, expansion]"
            )
        if any(not 0.0 < lv <= 1.0 for lv in self.levels):
            raise ConfigError(f"{where}: 'levels' {self.levels} must be fractions in (0, 1]")
        if len(self.levels) == 2 and self.levels[1] <= self.levels[0]:
            raise ConfigError(f"{where}: expansion level {self.levels[1]} must be above "
                              f"the clustering level {self.levels[0]}")  # fmt: skip
        for key in ("split", "shard_size", "cap"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{where}: '{key}' {getattr(self, key)} must be >= 1")
        if self.weight < 0:
            raise ConfigError(f"{where}: 'weight' {self.weight} must be >= 0")
        if self.format == "esmatlas" and not (self.metadata or self.proxy_from_experimental):
            raise ConfigError(f"{where}: ESMAtlas needs 'metadata' (id, plddt, ptm table)")
        if self.proxy_from_experimental and self.format not in ("afdb", "esmatlas"):
            raise ConfigError(f"{where}: 'proxy_from_experimental' is for afdb/esmatlas only")
        if self.format == "oas" and self.split > 1:
            raise ConfigError(f"{where}: 'split' is for FASTA and structure bundles; OAS data "
                              "units are ingested one per array task")  # fmt: skip
        if self.members and self.format == "oas":
            raise ConfigError(f"{where}: 'members' is for archives; OAS units are .csv.gz files")

    @property
    def listed(self) -> bool:
        """Inventoried by the `list` stage (all but the demo's proxies, made from a few
        files by a stage, whose inputs the submitting process resolves)."""
        return not self.proxy_from_experimental

    @property
    def clustering_level(self) -> float:
        return self.levels[0]

    @property
    def expansion_level(self) -> float | None:
        return self.levels[1] if len(self.levels) > 1 else None


@dataclass
class PurgeConfig:
    # false: no validation set and no purge for any dataset (a quick look at the rest; the
    # paper's easy-search flags cost about 25 ms per training sequence on 2 cores)
    enabled: bool = True
    validation_size: int = 25_000  # validation proteins per dataset
    min_identity: float = 0.7  # fraction (mmseqs fident)

    def validate(self) -> None:
        if self.validation_size < 1:
            raise ConfigError(f"purge.validation_size {self.validation_size} must be >= 1")
        if not 0.0 <= self.min_identity <= 1.0:
            raise ConfigError(f"purge.min_identity {self.min_identity} is a fraction in [0, 1]")


@dataclass
class TokensConfig:
    """Table S4: the training token budget, shared between datasets by their weights."""

    budget: int = 1_000_000_000_000

    def validate(self) -> None:
        if self.budget < 1:
            raise ConfigError(f"tokens.budget {self.budget} must be >= 1")


@dataclass
class StructureOptions:
    """Filters (paper thresholds) and per-residue features (Table S5) by format."""

    pdb: PDBFilter = field(default_factory=PDBFilter)
    afdb: AFDBFilter = field(default_factory=AFDBFilter)
    esmatlas: ESMAtlasFilter = field(default_factory=ESMAtlasFilter)
    sasa: list[str] = field(default_factory=lambda: ["afdb", "esmatlas"])
    ss8: list[str] = field(default_factory=lambda: ["pdb", "afdb", "esmatlas"])
    min_residues: int = 1
    sasa_points: int = 1000

    def validate(self) -> None:
        for key in ("sasa", "ss8"):
            bad = set(getattr(self, key)) - set(STRUCTURE_FORMATS)
            if bad:
                raise ConfigError(
                    f"structures.{key}: {sorted(bad)} not in {list(STRUCTURE_FORMATS)}"
                )


@dataclass
class CodebookConfig:
    """The structure tokenizer: k-means over hand-made neighbourhood features (the default,
    fitted by the `codebook` stage), or a trained VQ-VAE: `vqvae` names its training
    checkpoint (a step folder, or a run's checkpoint folder: its newest), whose encoder the
    `codebook` stage exports and the `tokenize` stage runs; size then comes from it."""

    size: int = 4096  # structure tokens (the paper's VQ-VAE has 4096 codes)
    max_residues: int = 2_000_000  # residues sampled for the k-means fit
    iterations: int = 25
    vqvae: str = ""  # a structure tokenizer checkpoint (`esm3 train --config vqvae_stage1`)

    @property
    def kind(self) -> str:
        return "vqvae" if self.vqvae else "kmeans"

    def validate(self) -> None:
        if self.size < 2:
            raise ConfigError(f"codebook.size {self.size} must be >= 2")


@dataclass
class InterproConfig:
    """InterPro labels: function annotations of UniProt accessions (protein2ipr), of other
    proteins by their sequence ids (InterProScan TSV, e.g. MGnify), and site features for
    the residue-annotation track (see `esm3.data.interpro` for the formats). Sequence
    records are matched by id (a UniRef cluster by its representative's accession),
    structure chains by their UniProt accession."""

    protein2ipr: list[str] = field(default_factory=list)  # protein2ipr.dat(.gz)
    interproscan: list[str] = field(default_factory=list)  # InterProScan TSV files
    sites: list[str] = field(default_factory=list)  # site features TSV (residue annotations)
    # a site label enters the vocabulary when this many distinct proteins carry it
    min_site_proteins: int = 10
    note: str = ""  # what the inputs are (the demo's are labelled stand-ins)
    # Function token tables (ESM3 A.1.8), one of: built from InterPro's entry.list (with
    # interpro2go and go-basic.obo for GO names), or a folder of esm's own files used as
    # they are (esm's or our file names; see esm3.tokenize.function_tokens.FunctionFiles)
    entry_list: str = ""
    interpro2go: str = ""
    go_obo: str = ""
    function_files: str = ""
    min_keyword_entries: int = 1  # a keyword enters the tables when this many entries have it
    # esm's residue-annotation table (label,label_clean,count .csv from the model download):
    # residue labels in esm's order and ids, sites matched by description; min_site_proteins
    # is then unused
    residue_table: str = ""

    def validate(self) -> None:
        for key in ("min_site_proteins", "min_keyword_entries"):
            if getattr(self, key) < 1:
                raise ConfigError(f"interpro.{key} {getattr(self, key)} must be >= 1")
        if self.function_files and self.entry_list:
            raise ConfigError("interpro.function_files and interpro.entry_list both set: "
                              "give esm's files or InterPro's entry.list, not both")  # fmt: skip
        for key in ("interpro2go", "go_obo"):
            if getattr(self, key) and not self.entry_list:
                raise ConfigError(f"interpro.{key} needs interpro.entry_list (its entries)")
        if self.go_obo and not self.interpro2go:
            raise ConfigError("interpro.go_obo needs interpro.interpro2go (which GO terms)")

    @property
    def any(self) -> bool:
        return bool(self.protein2ipr or self.interproscan or self.sites)


@dataclass
class StageResources:
    """Per-stage job resources; 0 means the cluster profile's value."""

    cpus_per_task: int = 0
    mem_gb: float = 0.0
    time_min: int = 0
    items_per_task: int = 0  # items one array task works through (0: one, or more if needed)


@dataclass
class PreprocessConfig:
    name: str = "default"  # data folder: <workspace>/data/preprocess/<name>/
    seed: int = 0
    datasets: list[DatasetConfig] = field(default_factory=list)
    purge: PurgeConfig = field(default_factory=PurgeConfig)
    tokens: TokensConfig = field(default_factory=TokensConfig)
    structures: StructureOptions = field(default_factory=StructureOptions)
    codebook: CodebookConfig = field(default_factory=CodebookConfig)
    interpro: InterproConfig = field(default_factory=InterproConfig)
    resources: dict[str, StageResources] = field(default_factory=dict)

    def validate(self) -> None:
        if not _NAME.match(self.name):
            raise ConfigError(f"config key 'name': {self.name!r}: letters, digits, '.', '_', '-'")
        names = [d.name for d in self.datasets]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"config key 'datasets': dataset name(s) {dup} used twice")
        bad = set(self.resources) - set(STAGES)
        if bad:
            raise ConfigError(
                f"config key 'resources': unknown stage(s) {sorted(bad)} (stages: {list(STAGES)})"
            )

    def of_type(self, kind: str) -> list[DatasetConfig]:
        return [d for d in self.datasets if d.type == kind]


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> PreprocessConfig:
    """The config from TOML, or by name from jobs/configs/preprocess (default: the demo
    config), with `key=value` overrides."""
    p = Path(path) if path else DEFAULT_CONFIG
    if not p.exists() and (CONFIG_DIR / f"{p}.toml").exists():
        p = CONFIG_DIR / f"{p}.toml"  # a config by name: demo, site-example
    return load(PreprocessConfig, p, overrides)


def expand_path(pattern: str, workspace: Path) -> str:
    """Replace `{workspace}` and `{package:NAME}` in a path; ConfigError when unknown."""

    def package(m: re.Match[str]) -> str:
        spec = importlib.util.find_spec(m.group(1))
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(f"path {pattern!r}: Python package {m.group(1)!r} is not installed")
        return str(next(iter(spec.submodule_search_locations)))

    out = re.sub(r"\{package:([A-Za-z0-9_.]+)\}", package, pattern)
    out = out.replace("{workspace}", str(workspace))
    if "{" in out and "}" in out and re.search(r"\{[a-z]+[^}]*\}", out):
        raise ConfigError(f"path {pattern!r}: unknown placeholder (use {{workspace}} or "
                          "{package:NAME})")  # fmt: skip
    return str(Path(out).expanduser())


def resolve_paths(patterns: list[str], workspace: Path, where: str) -> list[Path]:
    """Files matching `patterns` (in pattern order, each glob sorted); ConfigError if any
    pattern matches nothing or names a folder."""
    files: list[Path] = []
    for pat in patterns:
        p = expand_path(pat, workspace)
        hits = sorted(glob.glob(p)) if glob.has_magic(p) else ([p] if Path(p).exists() else [])
        if not hits:
            what = "no file matches" if glob.has_magic(p) else "file does not exist"
            raise ConfigError(f"{where}: input {pat!r} ({p}): {what}")
        for h in hits:
            if Path(h).is_dir():
                raise ConfigError(f"{where}: input {h} is a folder, not a file")
        files += [Path(h).resolve() for h in hits]
    return list(dict.fromkeys(files))


def check_patterns(
    patterns: list[str], workspace: Path, where: str
) -> tuple[list[str], list[Path]]:
    """(the expanded, absolute patterns of a dataset the `list` stage walks, the first file
    each matches); ConfigError when one matches nothing. Only the first match is looked
    for: the walk is the stage's."""
    out, firsts = [], []
    for pat in patterns:
        p = expand_path(pat, workspace)
        magic = glob.has_magic(p)
        first = next(glob.iglob(p), None) if magic else (p if Path(p).exists() else None)
        if first is None:
            what = "no file matches" if magic else "file does not exist"
            raise ConfigError(f"{where}: input {pat!r} ({p}): {what}")
        if not magic and Path(p).is_dir():
            raise ConfigError(f"{where}: input {p} is a folder, not a file")
        out.append(str(Path(p).absolute()))
        firsts.append(Path(first))
    return list(dict.fromkeys(out)), firsts


@dataclass
class Inputs:
    """The inputs of a config: files resolved by the submitting process (`datasets`), and
    the patterns of the datasets the `list` stage inventories (`patterns`; their
    `listings` once listed, see `jobs.stages.inventory`)."""

    datasets: dict[str, list[Path]]
    metadata: dict[str, Path | None]
    protein2ipr: list[Path]
    interproscan: list[Path]
    sites: list[Path] = field(default_factory=list)
    patterns: dict[str, list[str]] = field(default_factory=dict)
    # the function token tables' source: resolved interpro.entry_list / interpro2go / go_obo
    # or interpro.function_files (a folder), by key; empty when none
    function_source: dict[str, str] = field(default_factory=dict)
    residue_table: str = ""  # resolved interpro.residue_table ("" when none)
    listings: dict = field(default_factory=dict)  # dataset -> jobs.stages.inventory.Listing

    def has(self, dataset: str) -> bool:
        return dataset in self.datasets or dataset in self.patterns


def check_inputs(cfg: PreprocessConfig, workspace: Path, kinds: set[str]) -> Inputs:
    """Resolve every input the chosen pipelines read (kinds: sequences, structures,
    interpro, tokens); raise ConfigError naming the dataset and path on the first problem."""
    datasets: dict[str, list[Path]] = {}
    patterns: dict[str, list[str]] = {}
    metadata: dict[str, Path | None] = {}
    want = set()
    if "sequences" in kinds:
        want.add("sequence")
    if kinds & {"structures", "tokens"}:
        want.add("structure")
    for d in cfg.datasets:
        if d.type not in want:
            continue
        where = f"dataset '{d.name}'"
        if d.listed:  # the kinds of the first files now, of every file once listed
            patterns[d.name], firsts = check_patterns(d.paths, workspace, where)
            check_kinds(d, firsts, where)
        else:
            datasets[d.name] = resolve_paths(d.paths, workspace, where)
            check_kinds(d, datasets[d.name], where)
        metadata[d.name] = None
        if d.metadata and not d.proxy_from_experimental:
            (metadata[d.name],) = resolve_paths([d.metadata], workspace, f"{where} metadata")
    p2i: list[Path] = []
    ips: list[Path] = []
    sites: list[Path] = []
    function: dict[str, str] = {}
    table = ""
    if kinds & {"interpro", "structures", "sequences"}:
        p2i = resolve_paths(cfg.interpro.protein2ipr, workspace, "interpro.protein2ipr")
        ips = resolve_paths(cfg.interpro.interproscan, workspace, "interpro.interproscan")
        sites = resolve_paths(cfg.interpro.sites, workspace, "interpro.sites")
        function = function_source(cfg.interpro, workspace)
        table = residue_table(cfg.interpro, workspace)
    return Inputs(datasets, metadata, p2i, ips, sites, patterns, function_source=function,
                  residue_table=table)  # fmt: skip


def residue_table(ic: InterproConfig, workspace: Path) -> str:
    """The resolved interpro.residue_table ("" when unset), read once so that a missing
    file or column is one ConfigError now rather than in the vocabulary stage."""
    if not ic.residue_table:
        return ""
    paths = resolve_paths([ic.residue_table], workspace, "interpro.residue_table")
    if len(paths) != 1:
        raise ConfigError(f"interpro.residue_table: {ic.residue_table!r} matches "
                          f"{len(paths)} files, give one")  # fmt: skip
    path = paths[0].resolve()
    try:
        read_residue_table(path)
    except ValueError as e:
        raise ConfigError(f"interpro.residue_table: {e}") from e
    return str(path)


def function_source(ic: InterproConfig, workspace: Path) -> dict[str, str]:
    """The resolved inputs of the function token tables (see InterproConfig); ConfigError
    naming the key when a file is missing or the folder lacks one of esm's files."""
    if ic.function_files:
        folder = Path(expand_path(ic.function_files, workspace)).resolve()
        try:
            FunctionFiles.in_folder(folder)
        except ValueError as e:
            raise ConfigError(f"interpro.function_files: {e}") from e
        return {"function_files": str(folder)}
    keys = [k for k in ("entry_list", "interpro2go", "go_obo") if getattr(ic, k)]
    return {k: str(resolve_paths([getattr(ic, k)], workspace, f"interpro.{k}")[0]) for k in keys}


OAS_SUFFIXES = (".csv.gz", ".csv")


def check_kinds(d: DatasetConfig, files: list[Path], where: str) -> None:
    """Each input is of a kind the dataset's format reads: OAS data units for `oas`; for the
    others files or tar archives (`esm3.data.archives.is_archive`), archives only where a
    task streams them whole (no FASTA `split`, no demo `proxy_from_experimental`)."""
    for f in files:
        archive = is_archive(f)
        if d.format == "oas":
            if archive or not f.name.lower().endswith(OAS_SUFFIXES):
                raise ConfigError(f"{where}: input {f} is not an OAS data unit (.csv.gz); "
                                  "format 'oas' reads OAS's published units as they are")  # fmt: skip
        elif archive and d.type == "sequence" and d.split > 1:
            raise ConfigError(f"{where}: input {f} is an archive: 'split' cuts plain FASTA "
                              "files; an archive is ingested by one task (set split = 1)")  # fmt: skip
        elif archive and d.proxy_from_experimental:
            raise ConfigError(f"{where}: input {f} is an archive; 'proxy_from_experimental' "
                              "derives from plain structure files")  # fmt: skip
