"""InterPro function labels: protein2ipr.dat(.gz) and InterProScan TSV into one Parquet table.

Both inputs become rows (accession, ipr, name, signature, start, end) with 1-based,
inclusive residue positions, the convention of both files. Lines that cannot be read
become reject rows (dicts with the `rejects` columns stage, source, record, reason,
detail); they never stop a file.

protein2ipr.dat.gz: tab-separated UniProt accession, IPR id, IPR name, member-database
signature, start, end. The file has ~1.4 billion lines, so it is read by pyarrow's streaming
CSV reader (tab delimiter, no quoting, every field a string): blocks of lines become columns,
vectorised checks pass the rows that `parse_protein2ipr_line` would certainly accept
unchanged (plain ASCII positions and ids), and only the other lines (comments, blanks,
malformed or unusual lines; lines without 6 columns come through pyarrow's invalid-row
handler) go through that per-line parser, one at a time with their line numbers. The result
(rows, counts, rejects) equals the per-line reader's, `ingest_protein2ipr_lines`, which also
reads the rare files the streaming reader cannot match (see there).
InterProScan TSV (run with --goterms --iprlookup --pathways): protein accession, MD5,
length, analysis, signature accession, signature description, start, stop, score, status,
date, then with --iprlookup the IPR accession and description ('-' when the match has no
InterPro entry), GO terms, pathways. Matches without an IPR entry carry no InterPro label
and are counted, not rejected.

Site features (residue annotations): tab-separated protein accession, site label, site
description, start, end (1-based, inclusive), one line per site location, as extracted
from InterProScan's JSON/XML `sites` of a match (label: the signature's site type, e.g.
`cd00009:ATP binding site`). They become rows (accession, label, description, start, end).
"""

from __future__ import annotations

import gzip
import io
import json
import os
import re
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from esm3.data.duck import connect
from esm3.data.shards import atomic_path
from esm3.data.structures.records import ShardResult, reject, stored_result

IPR_SCHEMA = pa.schema(
    [
        ("accession", pa.string()),
        ("ipr", pa.string()),
        ("name", pa.string()),
        ("signature", pa.string()),
        ("start", pa.int32()),
        ("end", pa.int32()),
    ]
)


def _span_list_type(label: str) -> pa.DataType:
    """A record's labelled residue spans: list<struct<label, start, end>> (1-based)."""
    return pa.list_(pa.struct([(label, pa.string()), ("start", pa.int32()), ("end", pa.int32())]))


ANNOTATION_TYPE = _span_list_type("ipr")
SITE_SCHEMA = pa.schema(
    [
        ("accession", pa.string()),
        ("label", pa.string()),
        ("description", pa.string()),
        ("start", pa.int32()),
        ("end", pa.int32()),
    ]
)
RESIDUE_ANNOTATION_TYPE = _span_list_type("label")
_IPR_ID = re.compile(r"^IPR\d{6}$")
_MAX_POSITION = 2**31 - 1  # the int32 position columns


class Annotation(NamedTuple):
    ipr: str
    start: int  # 1-based, inclusive
    end: int  # 1-based, inclusive


def _text_lines(path: Path) -> Iterator[str]:
    with open(path, "rb") as f:
        magic = f.read(2)
    opener = gzip.open if magic == b"\x1f\x8b" else open
    with opener(path, "rb") as raw, io.TextIOWrapper(raw, encoding="utf-8", errors="replace") as t:
        yield from t


def _positions(start: str, end: str) -> tuple[int, int] | str:
    try:
        s, e = int(start), int(end)
    except ValueError:
        return f"start/end not integers: {start!r}, {end!r}"
    if s < 1 or e < s:
        return f"bad range {s}-{e} (1-based, inclusive, start <= end)"
    if e > _MAX_POSITION:
        return f"end {e} beyond {_MAX_POSITION}, the largest position stored"
    return s, e


def parse_protein2ipr_line(line: str) -> tuple[str, str, str, str, int, int] | str:
    """A parsed row, or a string saying why the line is malformed."""
    parts = line.rstrip("\n").split("\t")
    if len(parts) != 6:
        return f"{len(parts)} columns, expected 6"
    acc, ipr, name, sig, start, end = parts
    if not acc:
        return "empty accession"
    if not _IPR_ID.match(ipr):
        return f"bad InterPro id {ipr!r}"
    pos = _positions(start, end)
    if isinstance(pos, str):
        return pos
    return acc, ipr, name, sig, pos[0], pos[1]


def parse_interproscan_line(line: str) -> tuple[str, str, str, str, int, int] | None | str:
    """A parsed row, None for a match without an InterPro entry, or a malformed-line reason."""
    parts = line.rstrip("\n").split("\t")
    if len(parts) < 11:
        return f"{len(parts)} columns, expected at least 11"
    acc, sig, start, end = parts[0], parts[4], parts[6], parts[7]
    pos = _positions(start, end)
    if isinstance(pos, str):
        return pos
    ipr = parts[11] if len(parts) > 11 else "-"
    if ipr in ("-", ""):
        return None
    if not _IPR_ID.match(ipr):
        return f"bad InterPro id {ipr!r}"
    name = parts[12] if len(parts) > 12 else ""
    return acc, ipr, name, sig, pos[0], pos[1]


def parse_site_line(line: str) -> tuple[str, str, str, int, int] | str:
    """A parsed site row (accession, label, description, start, end), or why it is malformed."""
    parts = line.rstrip("\n").split("\t")
    if len(parts) != 5:
        return f"{len(parts)} columns, expected 5"
    acc, label, desc, start, end = parts
    if not acc or not label:
        return "empty accession or label"
    pos = _positions(start, end)
    if isinstance(pos, str):
        return pos
    return acc, label, desc, pos[0], pos[1]


def _ingest(
    src: Path,
    out_path: Path,
    parse,
    stage: str,
    accessions: Iterable[str] | None,
    batch_rows: int,
    max_rejects: int,
    schema: pa.Schema = IPR_SCHEMA,
) -> ShardResult:
    """The per-line reader: `parse` on every line that is not blank or a comment."""
    accessions = set(accessions) if accessions is not None else None
    out_path = Path(out_path)
    if out_path.exists():
        return stored_result(out_path)

    def fill(writer: pq.ParquetWriter) -> tuple[dict, list[dict], bool]:
        counts, rejects = _parse_lines(
            src, writer, schema, parse, stage, accessions, batch_rows, max_rejects
        )
        return counts, rejects, False  # always sorted, as before

    return _write_sorted(out_path, schema, batch_rows, fill)


def _new_counts() -> dict[str, int]:
    return {"lines": 0, "rows": 0, "malformed": 0, "no_ipr": 0, "filtered": 0}


def _parse_lines(
    src: Path,
    writer: pq.ParquetWriter,
    schema: pa.Schema,
    parse,
    stage: str,
    accessions: set[str] | None,
    batch_rows: int,
    max_rejects: int,
) -> tuple[dict, list[dict]]:
    cols: list[list] = [[] for _ in schema]
    rejects: list[dict] = []
    counts = _new_counts()

    def flush() -> None:
        if cols[0]:
            writer.write_table(pa.table(cols, schema=schema))
            for c in cols:
                c.clear()

    for n, line in enumerate(_text_lines(src), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        counts["lines"] += 1
        row = parse(line)
        if row is None:
            counts["no_ipr"] += 1
            continue
        if isinstance(row, str):
            counts["malformed"] += 1
            if len(rejects) < max_rejects:
                rejects.append(reject(stage, src, f"line {n}", "malformed", row))
            continue
        if accessions is not None and row[0] not in accessions:
            counts["filtered"] += 1
            continue
        for c, v in zip(cols, row, strict=True):
            c.append(v)
        counts["rows"] += 1
        if len(cols[0]) >= batch_rows:
            flush()
    flush()
    return counts, rejects


def _write_sorted(
    out_path: Path,
    schema: pa.Schema,
    batch_rows: int,
    fill: Callable[[pq.ParquetWriter], tuple[dict, list[dict], bool]],
) -> ShardResult:
    """`fill` writes rows to a temporary file and returns (counts, rejects, in_order); the
    rows land in `out_path` sorted by accession, the counts and rejects as its metadata.
    in_order: `fill` found the rows sorted and wrote them in row groups of `batch_rows`,
    so the temporary file is already the sort's output."""
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
            counts, rejects, in_order = fill(writer)
            meta = {"esm3.summary": json.dumps(counts), "esm3.rejects": json.dumps(rejects)}
            if in_order:
                writer.add_key_value_metadata(meta)
        if in_order:
            os.replace(tmp, out_path)
        else:
            _sort_by_accession(tmp, out_path, schema, batch_rows, meta)
    finally:
        tmp.unlink(missing_ok=True)
    return ShardResult(counts, rejects)


def _sort_by_accession(
    src: Path, out_path: Path, schema: pa.Schema, batch_rows: int, meta: dict[str, str]
) -> None:
    """Rewrite `src` sorted by accession (input order within one), so that each row group
    covers a narrow accession range and a join with a shard's accessions skips the rest."""
    con = connect()
    try:
        batches = con.sql(
            """SELECT * EXCLUDE (file_row_number)
               FROM read_parquet($src, file_row_number = true)
               ORDER BY accession, file_row_number""",
            params={"src": str(src)},
        ).to_arrow_reader(batch_rows)
        with atomic_path(out_path) as tmp, pq.ParquetWriter(tmp, schema, compression="zstd") as w:
            for b in batches:
                w.write_table(pa.Table.from_batches([b]).cast(schema))
            w.add_key_value_metadata(meta)
    finally:
        con.close()


# protein2ipr streaming reader: pyarrow parses blocks of lines into columns, vectorised
# checks pass the rows that the per-line parser would certainly accept unchanged, and only
# the others (comments, blanks, malformed or unusual lines) see the per-line parser.

_P2I_BLOCK = 1 << 23  # bytes per parsed block; a longer line sends the file per-line
_IPR_ASCII = r"^IPR[0-9]{6}$"  # the ASCII subset of _IPR_ID (\d takes any Unicode digit)
_MAX_DIGITS = 9  # up to 9 ASCII digits always fit int32 and read as int() reads them


class _NeedsPerLine(Exception):
    """The streaming reader cannot match the per-line reader on this file."""


def _byte_stream(path: Path) -> pa.NativeFile:
    with open(path, "rb") as f:
        magic = f.read(2)
    return pa.input_stream(str(path), compression="gzip" if magic == b"\x1f\x8b" else None)


def _csv_batches(path: Path, block_size: int, on_invalid) -> Iterator[pa.RecordBatch]:
    """protein2ipr lines as string columns, every field verbatim: no quoting, no null
    values, invalid UTF-8 kept (the caller decodes it). Empty lines stay rows, so every line
    is either a row or a call of `on_invalid` (a line without 6 columns, numbered by pyarrow:
    its numbers need use_threads=False)."""
    with _byte_stream(path) as head:
        first = head.read(3)
    if not first:
        return  # pyarrow refuses an empty file
    if first == b"\xef\xbb\xbf":  # pyarrow drops it, the per-line reader keeps it
        raise _NeedsPerLine("UTF-8 byte-order mark")
    names = IPR_SCHEMA.names
    try:
        with _byte_stream(path) as stream:
            reader = pacsv.open_csv(
                stream,
                read_options=pacsv.ReadOptions(
                    column_names=names, use_threads=False, block_size=block_size
                ),
                parse_options=pacsv.ParseOptions(
                    delimiter="\t",
                    quote_char=False,
                    double_quote=False,
                    escape_char=False,
                    ignore_empty_lines=False,
                    invalid_row_handler=on_invalid,
                ),
                convert_options=pacsv.ConvertOptions(
                    column_types=dict.fromkeys(names, pa.string()),
                    check_utf8=False,
                    strings_can_be_null=False,
                ),
            )
            yield from reader
    except pa.ArrowInvalid as e:
        # a line longer than a block, or one pyarrow could not hand to `on_invalid` (its
        # text is not UTF-8): lines the per-line reader reads like any other
        if "CSV parse error" in str(e) or "straddl" in str(e):
            raise _NeedsPerLine(str(e)) from e
        raise


def _ascii(col: pa.Array) -> bool:
    """No byte >= 0x80 in the column's text (a tenth of the cost of validating UTF-8)."""
    values = col.buffers()[2]
    return values is None or int(np.frombuffer(values, np.uint8).max(initial=0)) < 0x80


def _decoded(batch: pa.RecordBatch) -> pa.RecordBatch:
    """Invalid UTF-8 replaced by U+FFFD, as the per-line reader decodes it."""
    cols = []
    for col in batch.columns:
        try:
            if not _ascii(col):
                col.validate(full=True)
        except pa.ArrowInvalid:
            raw = col.view(pa.binary()).to_pylist()
            col = pa.array([b.decode("utf-8", "replace") for b in raw], pa.string())
        cols.append(col)
    return pa.RecordBatch.from_arrays(cols, schema=batch.schema)


def _positions_int32(col: pa.Array) -> pa.Array:
    """Plain decimal positions as int32; 0 (never valid) where int() might read it
    otherwise or not at all, for the per-line parser to judge."""
    plain = pc.and_(pc.ascii_is_decimal(col), pc.less_equal(pc.binary_length(col), _MAX_DIGITS))
    if not pc.all(plain, min_count=0).as_py():
        col = pc.if_else(plain, col, "0")
    return pc.cast(col, pa.int32())


def _true_count(mask: pa.Array) -> int:
    return pc.sum(mask).as_py() or 0


class _FirstRejects:
    """The first `limit` malformed lines by line number, in whatever order they arrive
    (pyarrow reports short lines while parsing, the batch checks find the rest later)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.found: list[tuple[int, str]] = []

    def add(self, number: int, detail: str) -> None:
        self.found.append((number, detail))
        if len(self.found) > 2 * self.limit + 1024:
            self._trim()

    def _trim(self) -> None:
        self.found.sort(key=lambda f: f[0])
        del self.found[self.limit :]

    def rows(self, src: Path) -> list[dict]:
        self._trim()
        return [reject("interpro", src, f"line {n}", "malformed", d) for n, d in self.found]


class _LineNumbers:
    """Line numbers of batch rows. pyarrow numbers only the lines it refuses; every other
    line is the next batch row, so a batch's rows take the next numbers not refused."""

    def __init__(self) -> None:
        self.next = 1
        self.refused: deque[int] = deque()  # increasing; those not yet passed by a batch

    def take(self, n_rows: int) -> Callable[[np.ndarray], np.ndarray]:
        """Line numbers of the next `n_rows` rows: a function of row indices."""
        first, last, skipped = self.next, self.next + n_rows - 1, []
        while self.refused and self.refused[0] <= last:
            skipped.append(self.refused.popleft())
            last += 1
        self.next = last + 1
        # refused line k of the span follows rows_before[k] rows of the batch
        rows_before = np.asarray(skipped, dtype=np.int64) - first - np.arange(len(skipped))
        return lambda rows: first + rows + np.searchsorted(rows_before, rows, side="right")


class _Protein2iprStream:
    """Counts, rejects and rows of protein2ipr batches, equal to the per-line reader's."""

    def __init__(self, accessions: set[str] | None, max_rejects: int) -> None:
        self.counts = _new_counts()
        self.rejects = _FirstRejects(max_rejects)
        self.numbers = _LineNumbers()
        self.wanted = None if accessions is None else pa.array(sorted(accessions), pa.string())
        self.in_order = True  # the rows so far are sorted by accession
        self.last: str | None = None  # the accession of the last row so far

    def refused(self, row) -> str:
        """pyarrow's call for a line without 6 columns."""
        self.numbers.refused.append(row.number)
        self.read_line(row.text, row.number)
        return "skip"

    def read_line(self, line: str, number: int) -> tuple | None:
        """The per-line reader on one line: its row, or None (skipped or rejected)."""
        if not line.strip() or line.startswith("#"):
            return None
        self.counts["lines"] += 1
        row = parse_protein2ipr_line(line)
        if isinstance(row, str):
            self.counts["malformed"] += 1
            self.rejects.add(number, row)
            return None
        return row

    def rows(self, batch: pa.RecordBatch) -> pa.Table:
        """The batch's IPR_SCHEMA rows, in file order, after the `accessions` filter."""
        line_of = self.numbers.take(batch.num_rows)
        batch = _decoded(batch)
        acc, ipr, name, sig, start, end = batch.columns
        s, e = _positions_int32(start), _positions_int32(end)
        comment = pc.starts_with(acc, "#")
        sure = pc.and_(
            pc.and_(pc.invert(comment), pc.greater(pc.binary_length(acc), 0)),
            pc.and_(pc.match_substring_regex(ipr, _IPR_ASCII),
                    pc.and_(pc.greater_equal(s, 1), pc.greater_equal(e, s))),
        )  # fmt: skip
        table = pa.table([acc, ipr, name, sig, s, e], schema=IPR_SCHEMA).filter(sure)
        self.counts["lines"] += table.num_rows
        others = pc.invert(pc.or_(sure, comment))
        if _true_count(others):
            table = self._with_other_lines(batch, line_of, sure, others, table)
        return self._keep_wanted(table)

    def _with_other_lines(self, batch, line_of, sure, others, table: pa.Table) -> pa.Table:
        """`table` (the rows of `sure`) with the rows the per-line parser accepts among
        `others`, in file order; the rest are blank lines or rejects."""
        idx = np.flatnonzero(others.to_numpy(zero_copy_only=False))
        fields = zip(*(c.take(idx).to_pylist() for c in batch.columns), strict=True)
        numbers = line_of(idx).tolist()
        parsed = [self.read_line("\t".join(f), n) for f, n in zip(fields, numbers, strict=True)]
        rescued = [(i, r) for i, r in zip(idx, parsed, strict=True) if r is not None]
        if not rescued:
            return table
        extra = pa.Table.from_pylist(
            [dict(zip(IPR_SCHEMA.names, r, strict=True)) for _, r in rescued], IPR_SCHEMA
        )
        at = np.concatenate([np.flatnonzero(sure.to_numpy(zero_copy_only=False)),
                             [i for i, _ in rescued]])  # fmt: skip
        return pa.concat_tables([table, extra]).take(np.argsort(at, kind="stable"))

    def _keep_wanted(self, table: pa.Table) -> pa.Table:
        if self.wanted is not None:
            kept = table.filter(pc.is_in(table["accession"], value_set=self.wanted))
            self.counts["filtered"] += table.num_rows - kept.num_rows
            table = kept
        self.counts["rows"] += table.num_rows
        self._check_order(table["accession"])
        return table

    def _check_order(self, acc: pa.ChunkedArray) -> None:
        """Follow whether the rows stay sorted by accession, as DuckDB orders text (by
        bytes; by code points, as Python compares, for valid UTF-8)."""
        if not self.in_order or len(acc) == 0:
            return
        acc = acc.combine_chunks()
        follows = self.last is None or acc[0].as_py() >= self.last
        in_batch = pc.all(pc.greater_equal(acc[1:], acc[:-1]), min_count=0).as_py()
        self.in_order = follows and in_batch
        self.last = acc[-1].as_py()


def _stream_protein2ipr(
    src: Path,
    writer: pq.ParquetWriter,
    accessions: set[str] | None,
    max_rejects: int,
    block_size: int,
    batch_rows: int,
) -> tuple[dict, list[dict], bool]:
    """Counts, rejects, and whether the rows came sorted (see _write_sorted)."""
    stream = _Protein2iprStream(accessions, max_rejects)
    groups = _RowGroups(writer, batch_rows)
    for batch in _csv_batches(src, block_size, stream.refused):
        groups.add(stream.rows(batch))
    groups.close()
    return stream.counts, stream.rejects.rows(src), stream.in_order


class _RowGroups:
    """Tables written as row groups of exactly `rows` rows (the last one shorter), as
    `_sort_by_accession` writes them, so that sorted input can skip the sort."""

    def __init__(self, writer: pq.ParquetWriter, rows: int) -> None:
        self.writer, self.rows = writer, rows
        self.pending: list[pa.Table] = []
        self.n = 0

    def add(self, table: pa.Table) -> None:
        self.pending.append(table)
        self.n += table.num_rows
        if self.n >= self.rows:
            whole = pa.concat_tables(self.pending)
            full = self.n - self.n % self.rows
            self.writer.write_table(whole.slice(0, full), row_group_size=self.rows)
            self.pending, self.n = [whole.slice(full)], self.n - full

    def close(self) -> None:
        if self.n:
            self.writer.write_table(pa.concat_tables(self.pending), row_group_size=self.rows)


def ingest_protein2ipr(
    src: str | Path,
    out_path: str | Path,
    accessions: Iterable[str] | None = None,
    batch_rows: int = 1_000_000,
    max_rejects: int = 100_000,
    block_size: int = _P2I_BLOCK,
) -> ShardResult:
    """Stream protein2ipr.dat(.gz) into a Parquet file of IPR_SCHEMA rows.

    `accessions` keeps only those proteins. Skips the work when `out_path` exists (its
    stored summary and rejects are returned, summary['skipped'] = True). The result equals
    `ingest_protein2ipr_lines`', which reads the rare files the streaming reader cannot.
    """
    src, out_path = Path(src), Path(out_path)
    if out_path.exists():
        return stored_result(out_path)
    acc = set(accessions) if accessions is not None else None

    def fill(writer: pq.ParquetWriter) -> tuple[dict, list[dict], bool]:
        return _stream_protein2ipr(src, writer, acc, max_rejects, block_size, batch_rows)

    try:
        return _write_sorted(out_path, IPR_SCHEMA, batch_rows, fill)
    except _NeedsPerLine:
        return ingest_protein2ipr_lines(src, out_path, accessions, batch_rows, max_rejects)


def ingest_protein2ipr_lines(
    src: str | Path,
    out_path: str | Path,
    accessions: Iterable[str] | None = None,
    batch_rows: int = 1_000_000,
    max_rejects: int = 100_000,
) -> ShardResult:
    """protein2ipr through the per-line reader: the reference of `ingest_protein2ipr`, and
    its way through a file that starts with a UTF-8 byte-order mark, has a line longer than
    a block, or a line without 6 columns that is not UTF-8."""
    return _ingest(
        Path(src),
        Path(out_path),
        parse_protein2ipr_line,
        "interpro",
        accessions,
        batch_rows,
        max_rejects,
    )


def ingest_interproscan(
    src: str | Path,
    out_path: str | Path,
    accessions: Iterable[str] | None = None,
    batch_rows: int = 1_000_000,
    max_rejects: int = 100_000,
) -> ShardResult:
    """InterProScan TSV output into a Parquet file of IPR_SCHEMA rows (IPR matches only)."""
    return _ingest(
        Path(src),
        Path(out_path),
        parse_interproscan_line,
        "interproscan",
        accessions,
        batch_rows,
        max_rejects,
    )


def ingest_sites(
    src: str | Path,
    out_path: str | Path,
    accessions: Iterable[str] | None = None,
    batch_rows: int = 1_000_000,
    max_rejects: int = 100_000,
) -> ShardResult:
    """Site features (accession, label, description, start, end TSV) into SITE_SCHEMA rows."""
    return _ingest(
        Path(src), Path(out_path), parse_site_line, "sites", accessions, batch_rows, max_rejects,
        SITE_SCHEMA,
    )  # fmt: skip


def frequent_labels(
    paths: Iterable[str | Path], column: str, schema: pa.Schema, min_proteins: int
) -> list[str]:
    """The values of `column` found in at least `min_proteins` distinct accessions, sorted:
    a vocabulary keeps the labels seen often enough to learn."""
    files = [str(p) for p in paths]
    if not files:
        return []
    if column not in schema.names or column == "accession":
        raise ValueError(f"{column!r} is not a label column of {schema.names}")
    con = connect()
    try:
        rows = con.execute(
            f"""SELECT "{column}" FROM read_parquet($files) GROUP BY "{column}"
                HAVING count(DISTINCT accession) >= $min ORDER BY "{column}" """,  # noqa: S608 - a schema column, checked above
            {"files": files, "min": int(min_proteins)},
        ).fetchall()
    finally:
        con.close()
    return [r[0] for r in rows]


def site_description_counts(paths: Iterable[str | Path]) -> list[tuple[str, str, int]]:
    """(label, description, rows) of ingested site tables, sorted: how each site label is
    described (esm's residue table is keyed by the description)."""
    files = [str(p) for p in paths]
    if not files:
        return []
    con = connect()
    try:
        rows = con.execute(
            """SELECT label, coalesce(description, ''), count(*) FROM read_parquet($files)
               GROUP BY ALL ORDER BY ALL""",
            {"files": files},
        ).fetchall()
    finally:
        con.close()
    return [(r[0], r[1], int(r[2])) for r in rows]


def interpro_vocabulary(paths: Iterable[str | Path]) -> pa.Table:
    """The InterPro terms of ingested tables: columns ipr, name, count, sorted by ipr.

    A term's index in this table is its vocabulary id.
    """
    con = connect()
    try:
        table = con.sql(
            """SELECT ipr, max(name) AS name, count(*) AS count FROM read_parquet($files)
               GROUP BY ipr ORDER BY ipr""",
            params={"files": [str(p) for p in paths]},
        ).to_arrow_table()
    finally:
        con.close()
    return table.cast(
        pa.schema([("ipr", pa.string()), ("name", pa.string()), ("count", pa.int64())])
    )


def annotations_relation(con, files: list[str], wanted: list[str]):  # type: ignore[no-untyped-def]
    """The rows of the ingested tables `files` whose accession is in `wanted`, in order.
    The tables are sorted by accession, so DuckDB's join filter (the min and max of
    `wanted`) skips every row group outside that range."""
    con.register("wanted", pa.table({"accession": wanted}))
    return con.sql(
        """SELECT t.accession, t.ipr, t.start, t."end"
           FROM read_parquet($files, filename = true, file_row_number = true) t
           SEMI JOIN wanted w ON t.accession = w.accession
           ORDER BY t.accession, t.start, t.ipr, list_position($files, t.filename),
                    t.file_row_number""",
        params={"files": files},
    )


def load_annotations(
    paths: Iterable[str | Path], accessions: Iterable[str]
) -> dict[str, list[Annotation]]:
    """accession -> its annotations (sorted by start, then ipr, then as stored), for the
    given accessions: a join of the sorted tables with them, reading only the row groups
    whose accession range holds one."""
    wanted = sorted(set(accessions))
    files = [str(p) for p in paths]
    if not wanted or not files:
        return {}
    con = connect()
    try:
        table = annotations_relation(con, files, wanted).to_arrow_table()
    finally:
        con.close()
    out: dict[str, list[Annotation]] = {}
    for acc, ipr, s, e in zip(*(table[c].to_pylist() for c in table.column_names), strict=True):
        out.setdefault(acc, []).append(Annotation(ipr, s, e))
    return out


def map_annotations(
    annotations: Iterable[Annotation], positions: np.ndarray | None, length: int
) -> list[dict]:
    """Annotations in the accession's coordinates -> 1-based inclusive spans of a sequence.

    positions: (length,) int, the accession coordinate of each residue (-1 when unmapped);
    None means the sequence is the accession's own (position i+1 for residue i). Spans are
    clipped to the residues that map; annotations that cover none are dropped.
    """
    out: list[dict] = []
    seen: set[tuple] = set()
    for a in annotations:
        if positions is None:
            s, e = max(a.start, 1), min(a.end, length)
            if s > e:
                continue
        else:
            inside = np.flatnonzero((positions >= a.start) & (positions <= a.end))
            if len(inside) == 0:
                continue
            s, e = int(inside[0]) + 1, int(inside[-1]) + 1
        key = (a.ipr, s, e)
        if key not in seen:  # the same IPR from several member signatures
            seen.add(key)
            out.append({"ipr": a.ipr, "start": s, "end": e})
    return out


def attach_annotations(
    accessions: Iterable[str | None],
    lengths: Iterable[int],
    lookup: Mapping[str, list[Annotation]],
) -> list[list[dict] | None]:
    """Per-sequence annotations (None where the accession has none) for sequences that are
    the accession's full sequence (UniProt, MGnify)."""
    out: list[list[dict] | None] = []
    for acc, n in zip(accessions, lengths, strict=True):
        anns = lookup.get(acc) if acc else None
        out.append(map_annotations(anns, None, n) or None if anns else None)
    return out
