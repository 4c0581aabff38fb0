"""InterPro function labels: protein2ipr.dat(.gz) and InterProScan TSV into one Parquet table.

Both inputs become rows (accession, ipr, name, signature, start, end) with 1-based,
inclusive residue positions, the convention of both files. Lines that cannot be read
become reject rows (dicts with the `rejects` columns stage, source, record, reason,
detail); they never stop a file.

protein2ipr.dat.gz: tab-separated UniProt accession, IPR id, IPR name, member-database
signature, start, end.
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
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
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
    accessions: set[str] | None,
    batch_rows: int,
    max_rejects: int,
    schema: pa.Schema = IPR_SCHEMA,
) -> ShardResult:
    out_path = Path(out_path)
    if out_path.exists():
        return stored_result(out_path)
    cols: list[list] = [[] for _ in schema]
    rejects: list[dict] = []
    counts = {"lines": 0, "rows": 0, "malformed": 0, "no_ipr": 0, "filtered": 0}
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:

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
    meta = {"esm3.summary": json.dumps(counts), "esm3.rejects": json.dumps(rejects)}
    try:
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


def ingest_protein2ipr(
    src: str | Path,
    out_path: str | Path,
    accessions: Iterable[str] | None = None,
    batch_rows: int = 1_000_000,
    max_rejects: int = 100_000,
) -> ShardResult:
    """Stream protein2ipr.dat(.gz) into a Parquet file of IPR_SCHEMA rows.

    `accessions` keeps only those proteins. Skips the work when `out_path` exists (its
    stored summary and rejects are returned, summary['skipped'] = True).
    """
    acc = set(accessions) if accessions is not None else None
    return _ingest(
        Path(src), Path(out_path), parse_protein2ipr_line, "interpro", acc, batch_rows, max_rejects
    )


def ingest_interproscan(
    src: str | Path,
    out_path: str | Path,
    accessions: Iterable[str] | None = None,
    batch_rows: int = 1_000_000,
    max_rejects: int = 100_000,
) -> ShardResult:
    """InterProScan TSV output into a Parquet file of IPR_SCHEMA rows (IPR matches only)."""
    acc = set(accessions) if accessions is not None else None
    return _ingest(
        Path(src),
        Path(out_path),
        parse_interproscan_line,
        "interproscan",
        acc,
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
    acc = set(accessions) if accessions is not None else None
    return _ingest(
        Path(src), Path(out_path), parse_site_line, "sites", acc, batch_rows, max_rejects,
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
        con.register("wanted", pa.table({"accession": wanted}))
        table = con.sql(
            """SELECT t.accession, t.ipr, t.start, t."end"
               FROM read_parquet($files, filename = true, file_row_number = true) t
               SEMI JOIN wanted w ON t.accession = w.accession
               ORDER BY t.accession, t.start, t.ipr, list_position($files, t.filename),
                        t.file_row_number""",
            params={"files": files},
        ).to_arrow_table()
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
