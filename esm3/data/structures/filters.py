"""Quality filters for PDB, AlphaFoldDB and ESMAtlas structures (paper A.2.1, Data).

Each check returns None when the item passes, else `(reason, detail)`: reason is short and
groupable (the `rejects.reason` column), detail says the value and the threshold.
Thresholds are config values; the defaults are the paper's.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
from duckdb import ColumnExpression, ConstantExpression, sqltypes

from esm3.data.duck import connect
from esm3.data.structures.geometry import long_range_contacts

Reject = tuple[str, str] | None


@dataclass(frozen=True)
class PDBFilter:
    """PDB entries: deposited before `deposited_before`, by `method`, resolution < max."""

    deposited_before: str = "2020-05-01"  # ISO date, exclusive
    methods: tuple[str, ...] = ("X-RAY DIFFRACTION",)  # an entry passes if it lists any
    max_resolution: float = 9.0  # Angstrom, exclusive ("better than 9 A")
    one_chain_per_entity: bool = True  # chains grouped by PDB ID + entity ID


@dataclass(frozen=True)
class AFDBFilter:
    """AlphaFoldDB chains: mean pLDDT (0-1) and long-range contacts per residue."""

    min_plddt: float = 0.7
    min_contacts_per_residue: float = 0.5  # contacts >= 0.5 L
    contact_distance: float = 8.0  # CA-CA, Angstrom, exclusive
    min_separation: int = 12  # sequence separation, exclusive (> 12)


@dataclass(frozen=True)
class ESMAtlasFilter:
    """ESMAtlas chains: mean pLDDT and pTM (both 0-1) from the metadata table."""

    min_plddt: float = 0.7
    min_ptm: float = 0.7


def check_pdb_entry(
    method: str | None, resolution: float | None, deposition_date: str | None, cfg: PDBFilter
) -> Reject:
    """Entry-level PDB filter on the file's metadata."""
    if not deposition_date:
        return "no_deposition_date", "entry has no deposition date"
    if deposition_date >= cfg.deposited_before:  # ISO dates compare as strings
        return "deposited_after", f"deposited {deposition_date}, needs < {cfg.deposited_before}"
    listed = [m.strip() for m in (method or "").split(";") if m.strip()]
    if not any(m in cfg.methods for m in listed):
        return "method", f"method {method or 'unknown'!r} not in {list(cfg.methods)}"
    if resolution is None:
        return "no_resolution", "entry has no resolution"
    if not resolution < cfg.max_resolution:
        return "resolution", f"resolution {resolution} A, needs < {cfg.max_resolution} A"
    return None


def check_afdb_chain(plddt: np.ndarray, backbone: np.ndarray, cfg: AFDBFilter) -> Reject:
    """pLDDT (L,) in 0-1 and backbone (L, 3, 3): mean pLDDT and globularity."""
    mean = float(np.nanmean(plddt)) if len(plddt) else float("nan")
    if not mean >= cfg.min_plddt:
        return "plddt", f"mean pLDDT {mean:.3f} < {cfg.min_plddt}"
    n = long_range_contacts(backbone, cfg.contact_distance, cfg.min_separation)
    need = cfg.min_contacts_per_residue * len(backbone)
    if n < need:
        return "contacts", f"{n} long-range contacts < {cfg.min_contacts_per_residue} L = {need:g}"
    return None


def check_esmatlas_chain(plddt: float | None, ptm: float | None, cfg: ESMAtlasFilter) -> Reject:
    """Mean pLDDT and pTM (0-1) from the ESMAtlas metadata."""
    if ptm is None or plddt is None or np.isnan(ptm) or np.isnan(plddt):
        return "no_metadata", "no pLDDT/pTM for this id in the metadata table"
    if not plddt >= cfg.min_plddt:
        return "plddt", f"mean pLDDT {plddt:.3f} < {cfg.min_plddt}"
    if not ptm >= cfg.min_ptm:
        return "ptm", f"pTM {ptm:.3f} < {cfg.min_ptm}"
    return None


def normalize_plddt(values: np.ndarray, scale: str = "auto") -> np.ndarray:
    """pLDDT on 0-1. scale: '0-100' (AFDB), '0-1' (often ESMFold), or 'auto' (0-100 when
    any value exceeds 1)."""
    v = np.asarray(values, dtype=np.float32)
    if scale == "auto":
        scale = "0-100" if np.nanmax(v, initial=0.0) > 1.0 else "0-1"
    if scale == "0-100":
        return v / np.float32(100.0)
    if scale == "0-1":
        return v
    raise ValueError(f"plddt scale must be 'auto', '0-1' or '0-100', got {scale!r}")


def metadata_relation(con, path: str | Path, need_ptm: bool = True):  # type: ignore[no-untyped-def]
    """A DuckDB relation (id, plddt, ptm) over a confidence table, Parquet or CSV/TSV.

    Columns: `id` (or `name`), `plddt` (or `mean_plddt`), `ptm` (NULL where absent and not
    `need_ptm`). The values are as stored (pLDDT may be on 0-100)."""
    path = Path(path)
    if path.suffix == ".parquet":
        rel = con.read_parquet(str(path))
    else:
        rel = con.read_csv(str(path), header=True, all_varchar=True,
                           sep="\t" if path.suffix in (".tsv", ".tab") else ",")  # fmt: skip
    cols = {c.lower(): c for c in rel.columns}

    def pick(*names: str) -> ColumnExpression:
        for n in names:
            if n in cols:
                return ColumnExpression(cols[n])
        raise ValueError(f"{path}: needs one of the columns {names}, has {rel.columns}")

    ptm = pick("ptm") if need_ptm or "ptm" in cols else ConstantExpression(None)
    # the file's own column names as column expressions: no SQL text is built
    return rel.select(
        pick("id", "name").cast(sqltypes.VARCHAR).alias("id"),
        pick("plddt", "mean_plddt").cast(sqltypes.DOUBLE).alias("plddt"),
        ptm.cast(sqltypes.DOUBLE).alias("ptm"),
    )


def read_esmatlas_metadata(
    path: str | Path, ids: Iterable[str] | None = None
) -> dict[str, tuple[float, float]]:
    """id -> (mean pLDDT, pTM) on 0-1 from a Parquet or CSV/TSV table, for `ids` only
    (None: every row). A DuckDB scan keeps only the rows asked for, so a task's memory
    follows its ids, not the table (the ESMAtlas table has hundreds of millions of rows).

    Columns as `metadata_relation` reads them. A pLDDT column on 0-100 (any value read
    > 1) is divided by 100.
    """
    con = connect()
    try:
        meta = metadata_relation(con, path)
        if ids is not None:
            wanted = pa.table({"id": sorted(set(ids))}, schema=pa.schema([("id", pa.string())]))
            meta = meta.join(con.from_arrow(wanted), "id", how="semi")
        rows = meta.fetchall()
    finally:
        con.close()
    nan = float("nan")
    rows = [(i, nan if a is None else a, nan if b is None else b) for i, a, b in rows]
    scale = 100.0 if max((r[1] for r in rows if r[1] == r[1]), default=0.0) > 1.0 else 1.0
    return {i: (float(a) / scale, float(b)) for i, a, b in rows}


class MetadataLookup(Mapping):
    """id -> (mean pLDDT, pTM) read from a metadata table as ids are asked for (`need`):
    a bundle's entry ids are known only as its members are read, so a task looks up each
    batch of members in one scan and holds only the rows of its own entries."""

    def __init__(self, path: str | Path) -> None:
        self.path = path
        self.rows: dict[str, tuple[float, float]] = {}
        self.asked: set[str] = set()

    def need(self, ids: Iterable[str]) -> None:
        new = set(ids) - self.asked
        if new:
            self.rows.update(read_esmatlas_metadata(self.path, new))
            self.asked |= new

    def __getitem__(self, key: str) -> tuple[float, float]:
        return self.rows[key]

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)


def pdb_entity_groups(chains: Iterable[Mapping[str, str]]) -> dict[str, list[str]]:
    """Group chain records (with keys id, entry, entity) by '<PDB ID>_<entity>'."""
    groups: dict[str, list[str]] = {}
    for c in chains:
        groups.setdefault(f"{c['entry'].upper()}_{c['entity']}", []).append(c["id"])
    return groups
