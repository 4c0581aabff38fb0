"""The training store: one dataset as memory-mappable files, the contract between
preprocessing and training (DESIGN.md, "Data at scale").

    store.json               format and version, counts, columns, every file's size
    records.arrow            Arrow IPC file, uncompressed, batches of `batch_rows` rows (the
                             last may be shorter), so row r is row r % batch_rows of batch
                             r // batch_rows: raw values only (residues, coordinates, per-
                             residue numbers, codebook indices, InterPro accessions), never
                             vocabulary ids, so vocabularies can change without a rebuild
    center_offsets.npy       int64 (C + 1,): the members of center c are
                             member_rows[center_offsets[c]:center_offsets[c + 1]]
    member_rows.npy          int64 (M,): the record row of each cluster member
    generated_offsets.npy    int64 (N + 1,): the inverse-folded sequences of record r are rows
    generated.arrow          [generated_offsets[r], generated_offsets[r + 1]) of this file
    codebook.npz, vocab.json the structure codebook and annotation vocabularies it was built
                             with (when the preprocessing had them), and the function token
                             tables vocab.json names (function-tokens/)

`write_store` works out of core: records stream through pyarrow batch by batch; the
id -> row join, the grouping of members by center and the generated sequences' CSR run in
DuckDB under a memory limit with a temporary directory. `open_store` maps the files: a
process's resident memory follows the pages it touches, not the number of records.

The index reproduces what the in-memory loader built: members in the cluster files' order
when they come grouped by center, else stably sorted by center; members without a record
dropped (counted); a member's row is the first record with its id.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from esm3.data.shards import streamed

FORMAT = "esm3-training-store"
VERSION = 1
BATCH_ROWS = 1024
READ_ROWS = 8192  # rows per batch when streaming input Parquet

#: Record columns training reads (Protein.from_record); `id` names records in errors.
COLUMNS = (
    "id",
    "sequence",
    "length",
    "coords",
    "plddt",
    "sasa",
    "ss8",
    "structure_tokens",
    "annotations",
    "residue_annotations",
)
ARRAYS = ("center_offsets.npy", "member_rows.npy", "generated_offsets.npy")


class StoreError(ValueError):
    """A store that cannot be written or used; one line naming the file and reason."""


# --- writing -----------------------------------------------------------------------------


def _schema(files: Sequence[Path], columns: Sequence[str]) -> pa.Schema:
    """The record columns present in any file, types unified across files."""
    schemas = []
    for f in files:
        try:
            s = pq.read_schema(f)
        except Exception as e:  # noqa: BLE001 - pyarrow's many error types
            raise StoreError(f"{f}: not a readable Parquet file ({e})") from e
        if "id" not in s.names or "sequence" not in s.names:
            raise StoreError(f"{f}: has no 'id' and 'sequence' columns")
        schemas.append(pa.schema([s.field(c) for c in columns if c in s.names]))
    merged = pa.unify_schemas(schemas, promote_options="permissive")
    return pa.schema([merged.field(c) for c in columns if c in merged.names])


def _conform(batch: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
    cols = []
    for f in schema:
        if f.name in batch.schema.names:
            cols.append(batch.column(f.name).cast(f.type))
        else:
            cols.append(pa.nulls(batch.num_rows, f.type))
    return pa.RecordBatch.from_arrays(cols, schema=schema)


def _rebatch(batches: Iterator[pa.RecordBatch], rows: int) -> Iterator[pa.RecordBatch]:
    """The same rows in batches of exactly `rows` (the last may be shorter)."""
    pending: list[pa.RecordBatch] = []
    n = 0
    for b in batches:
        pending.append(b)
        n += b.num_rows
        while n >= rows:
            table = pa.Table.from_batches(pending)
            yield table.slice(0, rows).combine_chunks().to_batches()[0]
            rest = table.slice(rows)
            pending, n = rest.combine_chunks().to_batches() if rest.num_rows else [], rest.num_rows
    if n:
        yield pa.Table.from_batches(pending).combine_chunks().to_batches()[0]


def _stream(files: Sequence[Path], columns: Sequence[str]) -> Iterator[pa.RecordBatch]:
    for f in files:
        try:
            pf = streamed(f)
            present = [c for c in columns if c in pf.schema_arrow.names]
            yield from pf.iter_batches(batch_size=READ_ROWS, columns=present)
        except (OSError, pa.ArrowException) as e:
            raise StoreError(f"{f}: cannot read records ({e})") from e


def _write_records(
    files: Sequence[Path], out: Path, ids_out: Path, batch_rows: int
) -> tuple[int, list[str], int]:
    """records.arrow and a Parquet of (id, row); returns rows, columns, rows without coords."""
    schema = _schema(files, COLUMNS)
    rows = no_coords = 0
    opts = pa.ipc.IpcWriteOptions(compression=None)
    id_schema = pa.schema([("id", pa.string()), ("row", pa.int64())])
    with (
        pa.OSFile(str(out), "wb") as sink,
        pa.ipc.new_file(sink, schema, options=opts) as writer,
        pq.ParquetWriter(ids_out, id_schema) as ids,
    ):
        conformed = (_conform(b, schema) for b in _stream(files, schema.names))
        for b in _rebatch(conformed, batch_rows):
            writer.write_batch(b)
            ids.write_batch(
                pa.record_batch(
                    [
                        b.column("id").cast(pa.string()),
                        pa.array(np.arange(rows, rows + b.num_rows)),
                    ],
                    schema=id_schema,
                )
            )
            if "coords" in schema.names:
                no_coords += b.column("coords").null_count
            else:
                no_coords += b.num_rows
            rows += b.num_rows
    if rows == 0:
        raise StoreError(f"{files[0]} ...: the shards hold no records")
    return rows, schema.names, no_coords


def _write_pairs(files: Sequence[Path], columns: tuple[str, str], out: Path) -> None:
    """(a, b, ord) rows of Parquet files in order: `ord` keeps the files' row order."""
    schema = pa.schema([(columns[0], pa.string()), (columns[1], pa.string()), ("ord", pa.int64())])
    n = 0
    with pq.ParquetWriter(out, schema) as w:
        for f in files:
            try:
                pf = streamed(f)
                for b in pf.iter_batches(batch_size=READ_ROWS * 8, columns=list(columns)):
                    w.write_batch(
                        pa.record_batch(
                            [b.column(0).cast(pa.string()), b.column(1).cast(pa.string()),
                             pa.array(np.arange(n, n + b.num_rows))],
                            schema=schema,
                        )
                    )  # fmt: skip
                    n += b.num_rows
            except (OSError, pa.ArrowException, KeyError) as e:
                raise StoreError(f"{f}: cannot read columns {list(columns)} ({e})") from e


def _connect(tmp: Path, memory_limit: str | None, threads: int | None) -> Any:
    from esm3.data.duck import connect

    con = connect(memory_limit, threads, tmp)
    con.execute("SET preserve_insertion_order = true")
    return con


def _to_npy(reader: Any, path: Path, n: int, column: str, dtype: Any = np.int64) -> None:
    """Stream one integer column of a DuckDB result into a .npy of n values."""
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(n,))
    i = 0
    for b in reader:
        v = b.column(column).to_numpy(zero_copy_only=False)
        arr[i : i + len(v)] = v
        i += len(v)
    if i != n:
        raise StoreError(f"{path}: wrote {i} values, expected {n}")
    arr.flush()
    del arr


def _write_index(con: Any, tmp: Path, out: Path) -> tuple[int, int, int]:
    """center_offsets.npy and member_rows.npy; returns (centers, members, dropped)."""
    con.execute(
        "CREATE TEMP TABLE m AS SELECT c.center, c.ord, i.row FROM read_parquet(?) c "
        "JOIN (SELECT id, min(row) AS row FROM read_parquet(?) GROUP BY id) i ON c.member = i.id",
        [str(tmp / "clusters.parquet"), str(tmp / "ids.parquet")],
    )
    total = con.execute("SELECT count(*) FROM read_parquet(?)", [str(tmp / "clusters.parquet")])
    total = total.fetchone()[0]
    members = con.execute("SELECT count(*) FROM m").fetchone()[0]
    if members == 0:
        raise StoreError("no cluster member has a record in the shards")
    runs, centers = con.execute(
        "SELECT count(*) FILTER (WHERE prev IS NULL OR prev <> center), count(DISTINCT center) "
        "FROM (SELECT center, lag(center) OVER (ORDER BY ord) AS prev FROM m)"
    ).fetchone()
    # grouped by center as written: keep the order; else sort stably by center
    order = "ord" if runs == centers else "center, ord"
    con.execute(
        f"CREATE TEMP TABLE s AS SELECT row, coalesce(lag(center) OVER (ORDER BY {order}) "  # noqa: S608 - order is one of two constants
        f"<> center, true) AS new, row_number() OVER (ORDER BY {order}) - 1 AS pos FROM m"
    )
    _to_npy(con.sql("SELECT row FROM s ORDER BY pos").to_arrow_reader(), out / "member_rows.npy",
            members, "row")  # fmt: skip
    starts = con.sql("SELECT pos FROM s WHERE new ORDER BY pos").to_arrow_reader()
    offsets = np.lib.format.open_memmap(out / "center_offsets.npy", "w+", np.int64, (centers + 1,))
    i = 0
    for b in starts:
        v = b.column("pos").to_numpy()
        offsets[i : i + len(v)] = v
        i += len(v)
    offsets[centers] = members
    offsets.flush()
    del offsets
    return centers, members, total - members


def _write_generated(con: Any, tmp: Path, out: Path, rows: int, has: bool) -> int:
    """generated.arrow and generated_offsets.npy (empty when there is nothing)."""
    schema = pa.schema([("sequence", pa.string())])
    offsets = np.lib.format.open_memmap(out / "generated_offsets.npy", "w+", np.int64, (rows + 1,))
    offsets[:] = 0
    n = 0
    opts = pa.ipc.IpcWriteOptions(compression=None)
    with (
        pa.OSFile(str(out / "generated.arrow"), "wb") as sink,
        pa.ipc.new_file(sink, schema, options=opts) as w,
    ):
        if has:
            q = con.sql(
                "SELECT i.row, g.sequence FROM read_parquet($g) g JOIN (SELECT id, min(row) AS row "
                "FROM read_parquet($i) GROUP BY id) i ON g.id = i.id ORDER BY i.row, g.ord",
                params={"g": str(tmp / "generated.parquet"), "i": str(tmp / "ids.parquet")},
            )
            for b in _rebatch(iter(q.to_arrow_reader()), BATCH_ROWS):
                w.write_batch(pa.record_batch([b.column("sequence").cast(pa.string())], schema))
                r = b.column("row").to_numpy()
                np.add.at(offsets, r + 1, 1)  # counts first; cumulated below
                n += b.num_rows
    np.cumsum(offsets, out=offsets)
    offsets.flush()
    del offsets
    return n


@dataclass(frozen=True)
class StoreSources:
    """What a store is written from: Parquet records, (center, member) clusters (none: every
    record is its own cluster), (id, sequence) inverse-folded sequences."""

    records: list[Path]
    clusters: list[Path]
    generated: list[Path]
    codebook: Path | None = None
    vocab: Path | None = None


def write_store(
    out: str | Path,
    name: str,
    type: str,
    sources: StoreSources,
    *,
    memory_limit: str | None = None,
    threads: int | None = None,
    batch_rows: int = BATCH_ROWS,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the store of one dataset to directory `out` (replaced atomically; the parent
    must exist); returns its store.json content (with `extra` added). Raises StoreError
    naming file and reason."""
    out = Path(out)
    if not sources.records:
        raise StoreError(f"dataset {name!r}: no record file to write a store from")
    part = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.part")
    tmp = part / "tmp"
    tmp.mkdir(parents=True)
    try:
        rows, columns, no_coords = _write_records(
            sources.records, part / "records.arrow", tmp / "ids.parquet", batch_rows
        )
        if sources.clusters:
            _write_pairs(sources.clusters, ("center", "member"), tmp / "clusters.parquet")
        else:  # every record its own cluster
            _self_clusters(tmp)
        if sources.generated:
            _write_pairs(sources.generated, ("id", "sequence"), tmp / "generated.parquet")
        con = _connect(tmp, memory_limit, threads)
        try:
            centers, members, dropped = _write_index(con, tmp, part)
            generated = _write_generated(con, tmp, part, rows, bool(sources.generated))
        finally:
            con.close()
        shutil.rmtree(tmp)
        tokenizer = _copy_tokenizer(sources.codebook, part)
        if sources.vocab is not None:
            shutil.copyfile(sources.vocab, part / "vocab.json")
        if sources.vocab is not None:
            _copy_function_tables(Path(sources.vocab), part)
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "name": name,
            "type": type,
            "rows": rows,
            "centers": centers,
            "members": members,
            "dropped_members": dropped,
            "generated": generated,
            "rows_without_coords": no_coords,
            "columns": columns,
            "batch_rows": batch_rows,
            "sources": {
                "records": [str(p) for p in sources.records],
                "clusters": [str(p) for p in sources.clusters],
                "generated": [str(p) for p in sources.generated],
            },
            "files": {p.name: p.stat().st_size for p in sorted(part.iterdir())},
            "structure_tokenizer": tokenizer,
            **(extra or {}),
        }
        (part / "store.json").write_text(json.dumps(meta, indent=1))
        _replace_dir(part, out)
        return meta
    except BaseException:
        shutil.rmtree(part, ignore_errors=True)
        raise


def _copy_function_tables(vocab: Path, part: Path) -> None:
    """The function token tables the vocabulary names (relative to it), copied to the same
    relative places, so the store's vocab.json reads as the original does."""
    names = json.loads(vocab.read_text()).get("function_files") or {}
    for name in names.values():
        dst = part / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(vocab.parent / name, dst)


def _copy_tokenizer(src: Path | None, part: Path) -> dict[str, Any] | None:
    """The structure tokenizer the records' tokens came from, copied beside them (the k-means
    codebook as codebook.npz, a VQ-VAE encoder as encoder.pt); its identity (kind, codebook
    size, digest) goes into store.json so training can refuse to mix tokenizers."""
    if src is None:
        return None
    from esm3.model.vqvae.tokenizer import identity

    dst = part / ("codebook.npz" if Path(src).suffix == ".npz" else "encoder.pt")
    shutil.copyfile(src, dst)
    return identity(dst)


def sources_fingerprint(sources: StoreSources, salt: str = "") -> str:
    """A digest of the format version, `salt` and every source file's path, size and
    modification time: equal digests mean a store need not be written again.
    FileNotFoundError names a missing source."""
    import hashlib

    h = hashlib.blake2b(digest_size=8)
    h.update(f"{VERSION}:{salt}".encode())
    for kind in ("records", "clusters", "generated", "codebook", "vocab"):
        paths = getattr(sources, kind)
        for p in paths if isinstance(paths, list) else [paths] if paths else []:
            st = Path(p).stat()
            h.update(f"{kind}:{Path(p).resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def _self_clusters(tmp: Path) -> None:
    t = streamed(tmp / "ids.parquet")
    schema = pa.schema([("center", pa.string()), ("member", pa.string()), ("ord", pa.int64())])
    with pq.ParquetWriter(tmp / "clusters.parquet", schema) as w:
        for b in t.iter_batches(batch_size=READ_ROWS * 8):
            w.write_batch(
                pa.record_batch([b.column("id"), b.column("id"), b.column("row")], schema)
            )


def _replace_dir(part: Path, out: Path) -> None:
    """Move `part` to `out`; an existing store is moved aside first and then removed."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.old")
        os.replace(out, old)
    os.replace(part, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# --- reading -----------------------------------------------------------------------------


def read_meta(path: str | Path) -> dict[str, Any]:
    """store.json, checked: format, version and every file present at its written size.
    Stats the files but opens none of them but store.json."""
    path = Path(path)
    f = path / "store.json"
    try:
        meta = json.loads(f.read_text())
    except FileNotFoundError:
        raise StoreError(
            f"store {path}: missing (no store.json); run the preprocessing's store stage"
        ) from None
    except (OSError, ValueError) as e:
        raise StoreError(f"store {path}: store.json is unreadable ({e})") from e
    if meta.get("format") != FORMAT:
        raise StoreError(f"store {path}: store.json is not an {FORMAT} ({meta.get('format')!r})")
    if meta.get("version") != VERSION:
        raise StoreError(
            f"store {path}: written by store format version {meta.get('version')}, this suite "
            f"reads version {VERSION}; rebuild it (re-run the preprocessing, or delete the "
            "store of an ad-hoc dataset)"
        )
    for name, size in meta["files"].items():
        try:
            actual = (path / name).stat().st_size
        except FileNotFoundError:
            raise StoreError(f"store {path}: {name} is missing") from None
        if actual != size:
            raise StoreError(
                f"store {path}: {name} is {actual} bytes, store.json says {size} "
                "(truncated or overwritten); rebuild the store"
            )
    return meta


class Store:
    """An open store: records and arrays memory-mapped, nothing read until asked for."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.meta = read_meta(self.path)
        self.batch_rows = int(self.meta["batch_rows"])
        self._records = pa.ipc.open_file(pa.memory_map(str(self.path / "records.arrow")))
        self._generated = pa.ipc.open_file(pa.memory_map(str(self.path / "generated.arrow")))
        self.center_offsets = np.load(self.path / "center_offsets.npy", mmap_mode="r")
        self.member_rows = np.load(self.path / "member_rows.npy", mmap_mode="r")
        self.generated_offsets = np.load(self.path / "generated_offsets.npy", mmap_mode="r")

    @property
    def name(self) -> str:
        return str(self.meta["name"])

    @property
    def type(self) -> str:
        return str(self.meta["type"])

    def __len__(self) -> int:
        return int(self.meta["rows"])

    def record(self, row: int) -> dict[str, Any]:
        """One record as Python values (the row of the Parquet shard it came from)."""
        if not 0 <= row < len(self):
            raise IndexError(f"store {self.path}: row {row} out of range [0, {len(self)})")
        b = self._records.get_batch(row // self.batch_rows)
        return b.slice(row % self.batch_rows, 1).to_pylist()[0]

    def take(self, rows: np.ndarray) -> pa.Table:
        """Records `rows` (ascending) as a table of the store's columns."""
        parts = [self._records.get_batch(int(r) // self.batch_rows).slice(int(r) % self.batch_rows, 1)
                 for r in rows]  # fmt: skip
        return pa.Table.from_batches(parts, schema=self._records.schema)

    def column(self, name: str) -> Iterator[pa.Array]:
        """One column, batch by batch (mapped, not copied)."""
        for i in range(self._records.num_record_batches):
            yield self._records.get_batch(i).column(name)

    def generated(self, row: int) -> list[str]:
        """The inverse-folded sequences generated for record `row`."""
        lo, hi = int(self.generated_offsets[row]), int(self.generated_offsets[row + 1])
        out: list[str] = []
        while lo < hi:
            b = self._generated.get_batch(lo // BATCH_ROWS)
            start = lo % BATCH_ROWS
            take = min(hi - lo, b.num_rows - start)
            out += b.column(0).slice(start, take).to_pylist()
            lo += take
        return out


def open_store(path: str | Path) -> Store:
    """Map the store at `path`; StoreError (one line) when it is missing, truncated or of
    another format version."""
    try:
        return Store(path)
    except StoreError:
        raise
    except (OSError, pa.ArrowException, ValueError) as e:
        raise StoreError(f"store {path}: cannot be mapped ({e})") from e
