"""Inventories of input files: one parallel walk of a dataset's glob patterns into Parquet.

A structure database is hundreds of millions of files (AFDB, ESM Atlas). Listing it with
`glob` plus a `stat` per file in the submitting process takes hours and holds every name in
memory; here the walk runs once, in a job, and writes `files.parquet` (path, size, id) and
`archives.parquet` (tar bundles, read in place later) in row groups as it goes. Every later
task reads a row range of the inventory (`read_paths`), never the pattern.

The walk: a pattern is split into the folder before its first wildcard and the components
after it; each level's folders are listed with `os.scandir` on a thread pool (the calls
wait on the file system, not on Python), children matched with `fnmatch` component by
component, as `glob` does without `**`. Names are sorted within a folder and folders are
visited in sorted order, so the inventory is the same on every run. A folder's entries are
held while it is listed (one folder, not the tree).

The prefilter (`prefilter_files`): where the source publishes per-entry confidence (the ESM
Atlas's metadata table of pLDDT and pTM; AFDB's global pLDDT), one DuckDB query joins the
inventory with it by entry id and drops the files below the thresholds before any structure
is opened. Files without a metadata row are kept (the structure stage rejects them with
their reason).
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from esm3.data.archives import is_archive
from esm3.data.duck import connect
from esm3.data.shards import atomic_path
from esm3.data.structures.io import file_stem

INVENTORY_SCHEMA = pa.schema([("path", pa.string()), ("size", pa.int64()), ("id", pa.string())])
ROW_GROUP = 1_000_000  # rows per row group: a task's range reads only the groups it spans
_MAGIC = re.compile(r"[*?[]")


class InventoryError(ValueError):
    """A pattern that matches nothing, or an inventory that cannot be read."""


def split_pattern(pattern: str) -> tuple[Path, list[str]]:
    """(the folder before the first wildcard, the components after it)."""
    parts = Path(pattern).parts
    first = next((i for i, p in enumerate(parts) if _MAGIC.search(p)), len(parts))
    return Path(*parts[:first]) if first else Path("."), list(parts[first:])


def _entries(folder: str) -> list[tuple[str, bool, int]]:
    """(name, is a folder, size) of a folder's entries, sorted by name; [] if unreadable."""
    try:
        with os.scandir(folder) as it:
            out = []
            for e in it:
                is_dir = e.is_dir()
                out.append((e.name, is_dir, 0 if is_dir else e.stat().st_size))
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return []
    return sorted(out)


def walk_pattern(pattern: str, pool: ThreadPoolExecutor) -> Iterator[tuple[str, int]]:
    """(path, size) of each file matching `pattern`, in sorted order, folders listed on `pool`."""
    root, comps = split_pattern(pattern)
    if not comps:  # no wildcard: one file
        if root.is_file():
            yield str(root), root.stat().st_size
        return
    folders = [str(root)]
    for depth, comp in enumerate(comps):
        last = depth == len(comps) - 1
        nxt: list[str] = []
        # map keeps the folders' order: the output stays sorted
        for folder, entries in zip(folders, pool.map(_entries, folders), strict=True):
            for name, is_dir, size in entries:
                if not fnmatch.fnmatchcase(name, comp) or (name.startswith(".") and comp[0] != "."):
                    continue
                path = os.path.join(folder, name)
                if last and not is_dir:
                    yield path, size
                elif not last and is_dir:
                    nxt.append(path)
        folders = nxt


@dataclass(frozen=True)
class ListSummary:
    files: int
    archives: int
    bytes: int


def _writer_rows(writer: pq.ParquetWriter, rows: list[tuple[str, int]]) -> None:
    if rows:
        paths, sizes = zip(*rows, strict=True)
        ids = [file_stem(Path(p)) for p in paths]
        writer.write_table(pa.table([list(paths), list(sizes), ids], schema=INVENTORY_SCHEMA))
        rows.clear()


def write_inventory(
    patterns: Sequence[str], out_dir: str | Path, *, threads: int = 16, where: str = "inputs"
) -> ListSummary:
    """Walk `patterns` (already expanded, absolute) into `out_dir`/files.parquet (plain
    files) and archives.parquet (tar bundles), streaming; a path matched by two patterns is
    listed once. InventoryError naming the pattern when one matches nothing."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    total = 0
    unique = list(dict.fromkeys(patterns))
    with (
        ThreadPoolExecutor(max(1, threads)) as pool,
        atomic_path(out / "files.parquet") as ftmp,
        atomic_path(out / "archives.parquet") as atmp,
        pq.ParquetWriter(ftmp, INVENTORY_SCHEMA, compression="zstd") as fw,
        pq.ParquetWriter(atmp, INVENTORY_SCHEMA, compression="zstd") as aw,
    ):
        kinds = {True: ([], aw, [0]), False: ([], fw, [0])}  # rows, writer, count
        for pat in unique:
            hits = 0
            for path, size in walk_pattern(pat, pool):
                hits += 1
                total += size
                rows, writer, count = kinds[is_archive(path)]
                rows.append((path, size))
                if len(rows) >= ROW_GROUP:
                    count[0] += len(rows)
                    _writer_rows(writer, rows)
            if not hits:
                raise InventoryError(f"{where}: input {pat!r}: no file matches")
        for rows, writer, count in kinds.values():
            count[0] += len(rows)
            _writer_rows(writer, rows)
        n_files, n_archives = kinds[False][2][0], kinds[True][2][0]
    if len(unique) > 1:  # patterns may overlap: keep each path's first row
        n_files = _drop_repeats(out / "files.parquet")
        n_archives = _drop_repeats(out / "archives.parquet")
    return ListSummary(n_files, n_archives, total)


def _drop_repeats(path: Path) -> int:
    """Rewrite an inventory file without repeated paths (first row kept, order kept) by a
    DuckDB query under the connection's memory limit; returns the rows left."""
    con = connect()
    try:
        rel = con.sql(
            """SELECT path, size, id FROM read_parquet($p, file_row_number = true)
               QUALIFY row_number() OVER (PARTITION BY path ORDER BY file_row_number) = 1
               ORDER BY file_row_number""",
            params={"p": str(path)},
        )
        n = 0
        with atomic_path(path) as tmp, pq.ParquetWriter(tmp, INVENTORY_SCHEMA,
                                                        compression="zstd") as w:  # fmt: skip
            for b in rel.to_arrow_reader(ROW_GROUP):
                n += b.num_rows
                w.write_table(pa.Table.from_batches([b]).cast(INVENTORY_SCHEMA))
        return n
    finally:
        con.close()


def count_rows(path: str | Path) -> int:
    """Rows of an inventory file, from its footer."""
    return pq.read_metadata(path).num_rows if Path(path).exists() else 0


def read_paths(path: str | Path, start: int, stop: int) -> list[str]:
    """Paths of rows [start, stop) of an inventory file, reading only the row groups the
    range spans."""
    pf = pq.ParquetFile(path)
    out: list[str] = []
    first = 0
    for g in range(pf.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        lo, hi = max(start, first), min(stop, first + n)
        if lo < hi:
            col = pf.read_row_group(g, columns=["path"]).column(0)
            out += col.slice(lo - first, hi - lo).to_pylist()
        first += n
        if first >= stop:
            break
    return out


def iter_paths(path: str | Path) -> Iterable[str]:
    """Every path of an inventory file, one row group in memory at a time."""
    pf = pq.ParquetFile(path)
    for g in range(pf.num_row_groups):
        yield from pf.read_row_group(g, columns=["path"]).column(0).to_pylist()


def sorted_metadata(src: str | Path, out: str | Path) -> int:
    """A confidence table (CSV/TSV or Parquet, columns as `metadata_relation` reads them)
    as Parquet (id, plddt, ptm) sorted by id: tasks then scan Parquet, not CSV, and a
    task's ids in a narrow range skip the other row groups. Returns the rows."""
    from esm3.data.structures.filters import metadata_relation

    con = connect()
    try:
        rel = metadata_relation(con, src, need_ptm=False).order("id")
        with atomic_path(Path(out)) as tmp:
            rel.write_parquet(str(tmp), compression="zstd", row_group_size=ROW_GROUP // 10)
        return count_rows(out)
    finally:
        con.close()


@dataclass(frozen=True)
class Prefilter:
    """Keep entries with metadata pLDDT >= min_plddt and (when `min_ptm` is set) pTM >=
    min_ptm; pLDDT on 0-100 in the table ("auto": any value > 1) is read as a fraction."""

    metadata: str
    min_plddt: float
    min_ptm: float | None = None
    plddt_scale: str = "auto"
    strip_model_suffix: bool = False  # AFDB files end `-model_vN`, its metadata ids do not


def prefilter_files(files: str | Path, out: str | Path, f: Prefilter) -> dict[str, int]:
    """Write the rows of inventory `files` that pass the metadata thresholds to `out`, in
    inventory order; returns counts (listed, kept, dropped, without_metadata)."""
    from esm3.data.structures.filters import metadata_relation

    con = connect()
    try:
        meta = metadata_relation(con, f.metadata, need_ptm=f.min_ptm is not None)
        con.register("meta", meta)
        params = {
            "files": str(files),
            "min_plddt": f.min_plddt,
            "min_ptm": -1.0 if f.min_ptm is None else f.min_ptm,  # pTM >= -1: no pTM test
            "scale": {"0-1": 1.0, "0-100": 100.0}.get(f.plddt_scale, 0.0),  # 0: auto
            "strip": f.strip_model_suffix,
        }
        # a file goes when a metadata row of its id fails; duplicate metadata ids are harmless
        joined = con.sql(
            """WITH s AS (SELECT CASE WHEN $scale > 0 THEN $scale
                                      WHEN (SELECT max(plddt) FROM meta) > 1 THEN 100.0
                                      ELSE 1.0 END AS scale),
                    inv AS (SELECT *, CASE WHEN $strip
                                 THEN regexp_replace(id, '-model_v[0-9]+$', '') ELSE id END AS key
                            FROM read_parquet($files, file_row_number = true))
               SELECT inv.path, inv.size, inv.id,
                      NOT EXISTS (SELECT 1 FROM meta m WHERE m.id = inv.key) AS missing,
                      NOT EXISTS (SELECT 1 FROM meta m, s WHERE m.id = inv.key AND NOT
                                  (m.plddt / s.scale >= $min_plddt
                                   AND coalesce(m.ptm, 1.0) >= $min_ptm)) AS keep
               FROM inv ORDER BY inv.file_row_number""",
            params=params,
        )
        counts = {"listed": 0, "kept": 0, "dropped": 0, "without_metadata": 0}
        with atomic_path(Path(out)) as tmp, pq.ParquetWriter(tmp, INVENTORY_SCHEMA,
                                                             compression="zstd") as w:  # fmt: skip
            for b in joined.to_arrow_reader(ROW_GROUP):
                keep = b.column("keep").to_numpy(zero_copy_only=False)
                counts["listed"] += b.num_rows
                counts["without_metadata"] += int(b.column("missing").to_numpy(False).sum())
                kept = pa.Table.from_batches([b]).filter(pa.array(keep))
                counts["kept"] += kept.num_rows
                w.write_table(kept.select(["path", "size", "id"]).cast(INVENTORY_SCHEMA))
        counts["dropped"] = counts["listed"] - counts["kept"]
        return counts
    finally:
        con.close()
