"""InterPro annotations of sequence records (UniRef, MGnify, ...): a DuckDB join of a
sequence shard with the ingested InterPro tables (`esm3.data.interpro`).

A record's accession is its id, except that a UniRef cluster id (`UniRef90_P12345`) is
matched by its representative's UniProt accession (`P12345`); MGnify ids are the
accessions InterProScan reports. Spans are 1-based and inclusive; those that start past
the sequence are dropped, those that end past it are clipped. The output is the shard with
two more columns, `annotations` (list of {ipr, start, end}: function labels) and
`residue_annotations` (list of {label, start, end}: site features), null where the record
has none (each list sorted by label, then start), rows in the input's order.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from esm3.data.clusters import _connect
from esm3.data.interpro import ANNOTATION_TYPE, RESIDUE_ANNOTATION_TYPE
from esm3.data.shards import atomic_path

_BATCH_ROWS = 65_536  # rows per streamed batch: memory follows this, not the shard

_ACCESSION = "regexp_replace(id, '^UniRef[0-9]+_', '')"

# per accession, its spans as a list of structs; `{cols}` are struct fields named by this
# module (never input text), the tables' paths are bound parameters
_SPANS = """
  SELECT a._acc, a._len, list(DISTINCT {{'{key}': t.{col}, 'start': t.start::INTEGER,
         'end': least(t."end", a._len)::INTEGER}}) AS {out}
  FROM read_parquet(${param}) t JOIN accs a ON t.accession = a._acc AND t.start <= a._len
  GROUP BY a._acc, a._len"""
_NONE = """
  SELECT NULL::VARCHAR AS _acc, NULL::BIGINT AS _len,
         NULL::STRUCT("{key}" VARCHAR, "start" INTEGER, "end" INTEGER)[] AS {out} WHERE false"""


def _spans(key: str, col: str, out: str, param: str, present: bool) -> str:
    return (_SPANS if present else _NONE).format(key=key, col=col, out=out, param=param)


def annotate_sequence_shard(
    src: str | Path,
    out: str | Path,
    interpro: Sequence[str | Path],
    sites: Sequence[str | Path] = (),
    *,
    threads: int | None = None,
    memory_limit: str | None = None,
    temp_dir: str | Path | None = None,
) -> dict:
    """Write `src` with `annotations` and `residue_annotations` to `out` (skipped when it
    exists). Returns counts: rows, annotated (records with a function label), with_sites."""
    out = Path(out)
    skipped = out.exists()
    if not skipped:
        con = _connect(memory_limit, threads, str(temp_dir) if temp_dir else None)
        params: dict[str, object] = {"src": str(src)}
        if interpro:
            params["interpro"] = [str(p) for p in interpro]
        if sites:
            params["sites"] = [str(p) for p in sites]
        function = _spans("ipr", "ipr", "annotations", "interpro", bool(interpro))
        residue = _spans("label", "label", "residue_annotations", "sites", bool(sites))
        try:
            batches = con.sql(
                f"""WITH s AS (SELECT *, {_ACCESSION} AS _acc, length(sequence) AS _len
                               FROM read_parquet($src, file_row_number = true)),
                    accs AS (SELECT DISTINCT _acc, _len FROM s),
                    f AS ({function}), r AS ({residue})
                    SELECT s.* EXCLUDE (_acc, _len, file_row_number),
                           list_sort(f.annotations) AS annotations,
                           list_sort(r.residue_annotations) AS residue_annotations
                    FROM s LEFT JOIN f ON f._acc = s._acc AND f._len = s._len
                    LEFT JOIN r ON r._acc = s._acc AND r._len = s._len
                    ORDER BY s.file_row_number""",  # noqa: S608 - fragments of this module only
                params=params,
            ).to_arrow_reader(_BATCH_ROWS)
            _write_batches(batches, out, output_schema(src))
        finally:
            con.close()
    return {**annotation_counts(out), "skipped": skipped}


def output_schema(src: str | Path) -> pa.Schema:
    """The input shard's columns (all nullable), then the two label columns: one schema for
    every shard of a dataset, whichever of its columns happen to hold no null."""
    base = pa.schema([f.with_nullable(True) for f in pq.read_schema(src).remove_metadata()])
    return base.append(pa.field("annotations", ANNOTATION_TYPE)).append(
        pa.field("residue_annotations", RESIDUE_ANNOTATION_TYPE)
    )


def _write_batches(batches: pa.RecordBatchReader, out: Path, schema: pa.Schema) -> None:
    """Stream the join's batches into `out` (whole or not at all) with `schema`."""
    with atomic_path(out) as tmp, pq.ParquetWriter(tmp, schema, compression="zstd") as w:
        for b in batches:
            w.write_table(pa.Table.from_batches([b]).cast(schema))


def annotation_counts(path: str | Path) -> dict:
    """rows, annotated (a function label), with_sites (a residue annotation) of a shard."""
    t = pq.read_table(path, columns=["annotations", "residue_annotations"])
    return {
        "rows": t.num_rows,
        "annotated": t.num_rows - t.column("annotations").null_count,
        "with_sites": t.num_rows - t.column("residue_annotations").null_count,
    }
