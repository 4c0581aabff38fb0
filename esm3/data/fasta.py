"""FASTA / FASTA.gz ingest into Parquet sequence shards, streamed with bounded memory.

The reader works on large byte blocks cut at record boundaries and parses each block with
numpy and Arrow kernels (no Python loop over lines or records), so throughput is that of a
few vectorized passes over the bytes. Memory is bounded by the block size (plus the largest
single record), whatever the input size.

Records
    One row per FASTA record with columns of `SEQUENCE_SCHEMA`. `offset` is the byte offset
    of the record's '>' in the uncompressed input, so any row or reject can be found again.

Alphabet
    The 20 standard amino acids plus X, B, U, Z, O. Lowercase letters (soft-masked
    regions in some databases) are upper-cased by default (`lowercase="upper"`; counted in
    the summary) or rejected with `lowercase="reject"`. One terminal '*' (the stop codon
    that gene callers write, as in JGI/IMG protein files) is removed. Bytes <= 0x20
    (whitespace, '\\r', control characters) inside sequence lines are ignored. Any other
    character rejects the record.

Rejects (the `rejects` table: stage, source, record, reason, detail)
    ``invalid_characters``, ``lowercase``, ``empty_sequence``, ``empty_id``,
    ``duplicate_id`` (within the shard; the first occurrence is kept). The stage carries on.

Errors (`FastaError`, naming the file and where possible the record)
    empty file, not FASTA (no leading '>'), binary content (NUL bytes), truncated or
    corrupt gzip. No shard is written in that case.

Header conventions (`header_format`; the default "auto" recognises UniProt and UniRef per
record and otherwise keeps the first word as id, which is also the MGnify convention; JGI
headers cannot be told apart from plain ones, so name them explicitly. OAS is not FASTA: its
data units are read by `esm3.data.oas`)
    uniprot  ``sp|P12345|NAME_HUMAN Desc OS=Homo sapiens OX=9606 GN=.. PE=1 SV=1``:
             id = accession, name = entry name, taxon = OS, taxid = OX
    uniref   ``UniRef90_P12345 Desc n=3 Tax=Homo sapiens TaxID=9606 RepID=NAME_HUMAN``:
             id = the cluster id (``UniRef90_P12345``), name = RepID
    mgnify   ``MGYP000012345678 PL=00 UP=0 BIOMES=...``: id = MGYP accession,
             description = the attributes
    jgi      ``Ga0123456_1000011 description [organism or sample]``: id = first word,
             name = the IMG assembly (``Ga0123456``), taxon = the bracketed text
    plain    anything else: id = the first word, description = the rest

Archives (`esm3.data.archives`)
    An input named `.tar`, `.tar.gz`, `.tgz` (also bzip2/xz) is a bundle, as JGI/IMG ships
    one `<taxon_oid>.tar.gz` per genome with `<taxon_oid>.genes.faa` inside. Its members named
    by `members` (default `*.faa`, `*.fasta`, each also `.gz`) are streamed one after the
    other into the same shard, gzip members decompressed on the fly, nothing unpacked to
    disk; the others (`.fna`, `.gff`, tables) are skipped and counted. `offset` then counts
    bytes through the members' uncompressed contents one after the other, and reject rows
    name `<archive>:<member>` as their source. A member that is empty or not FASTA is one
    reject row (``not_fasta``) and adds no rows; an archive that is truncated or corrupt is
    one reject row (``truncated_archive``) naming the member where it broke: the members
    before it are kept, that member's rows are dropped, the shard is written.
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from esm3.data.archives import FASTA_MEMBERS, ArchiveError, WalkStats, is_archive, iter_members
from esm3.data.duck import connect
from esm3.data.shards import (
    ShardWriter,
    atomic_path,
    is_done,
    parquet_writer,
    sql_path,
    tmp_path,
    write_table,
)

ALPHABET = "ACDEFGHIKLMNPQRSTVWYXBUZO"
HEADER_FORMATS = ("auto", "uniprot", "uniref", "mgnify", "jgi", "plain")
HeaderFormat = Literal["auto", "uniprot", "uniref", "mgnify", "jgi", "plain"]

SEQUENCE_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("dataset", pa.string()),
        ("sequence", pa.string()),
        ("length", pa.int32()),  # residues
        ("name", pa.string()),  # entry name / RepID / assembly / chain, by convention
        ("description", pa.string()),
        ("taxon", pa.string()),
        ("taxid", pa.int64()),
        ("offset", pa.int64()),  # byte offset of the record's '>' in the uncompressed input
    ]
)
REJECT_KEYS = ("stage", "source", "record", "reason", "detail")
REJECT_SCHEMA = pa.schema([(k, pa.string()) for k in REJECT_KEYS])

DEFAULT_BLOCK_BYTES = 4 << 20

_VALID = np.zeros(256, dtype=bool)
_VALID[np.frombuffer(ALPHABET.encode(), np.uint8)] = True
_LOWER = np.zeros(256, dtype=bool)
_LOWER[np.frombuffer(ALPHABET.lower().encode(), np.uint8)] = True
_CLASS = np.where(_VALID, 0, np.where(_LOWER, 1, 2)).astype(np.uint8)  # 0 ok, 1 lower, 2 bad
_NL, _GT, _STAR = 10, ord(">"), ord("*")

_AUTO_PREFIX = {"uniprot": ("sp|", "tr|"), "uniref": ("UniRef",)}


class FastaError(ValueError):
    """The input is not readable FASTA; the message names the file and the place."""


@dataclass
class _Block:
    """One parsed block: valid rows, rejects and counters."""

    batch: pa.RecordBatch
    rejects: list[dict]
    records: int
    lowercased: int
    stop_removed: int


def _open(path: Path) -> pa.NativeFile:
    """Open plain or gzip input (detected by magic bytes, not by name)."""
    with open(path, "rb") as f:
        magic = f.read(2)
    raw = pa.OSFile(str(path))
    if magic == b"\x1f\x8b":
        return pa.CompressedInputStream(raw, "gzip")
    return raw


def iter_blocks(
    path: str | Path,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    byte_range: tuple[int, int] | None = None,
) -> Iterator[tuple[int, bytes]]:
    """Yield (offset, bytes) blocks of whole FASTA records from `path`.

    Each block starts at a '>' and ends after the last byte of its last record; `offset` is
    its position in the uncompressed stream. `byte_range` (plain files only) reads the records
    starting in [start, end), as cut by `fasta_byte_ranges`.
    Raises FastaError on empty, binary, non-FASTA or corrupt compressed input.
    """
    path = Path(path)
    stream = _open(path)
    start, end = 0, None
    try:
        if byte_range is not None:
            if isinstance(stream, pa.CompressedInputStream):
                raise FastaError(f"{path}: byte ranges need an uncompressed file; use split_fasta")
            start, end = byte_range
            stream.seek(start)
        yield from stream_blocks(stream, str(path), block_bytes, start, end,
                                 whole=byte_range is None)  # fmt: skip
    finally:
        stream.close()


def stream_blocks(
    stream,  # type: ignore[no-untyped-def]
    name: str,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    start: int = 0,
    end: int | None = None,
    *,
    whole: bool = True,
) -> Iterator[tuple[int, bytes]]:
    """`iter_blocks` over an open binary stream (`read(n)`), named `name` in errors: a
    file, or a member of an archive. `whole`: the stream is a whole input (empty is an
    error), not a byte range of one. The caller closes the stream."""
    pos, carry, first = start, b"", True
    try:
        while True:
            want = block_bytes if end is None else min(block_bytes, end - pos - len(carry))
            data = stream.read(want) if want > 0 else b""
            buf = carry + data if carry else data
            if first:
                if not buf:
                    if whole:
                        raise FastaError(f"{name}: empty file (no FASTA records)")
                    return
                stripped = buf.lstrip()
                if b"\x00" in buf[:4096] or not stripped.startswith(b">"):
                    what = "binary content" if b"\x00" in buf[:4096] else "no '>' header"
                    raise FastaError(f"{name}: not a FASTA file ({what} at byte {pos})")
                pos += len(buf) - len(stripped)
                buf, first = stripped, False
            if not data:
                if buf:
                    _check_binary(name, pos, buf)
                    yield pos, buf
                return
            cut = buf.rfind(b"\n>")
            if cut < 0:  # a record longer than the block: keep reading
                carry = buf
                continue
            block, carry = buf[: cut + 1], buf[cut + 1 :]
            _check_binary(name, pos, block)
            yield pos, block
            pos += len(block)
    # Arrow reports truncated/corrupt gzip as OSError; Python's gzip also as EOFError/zlib
    except (OSError, EOFError, zlib.error) as e:
        raise FastaError(f"{name}: corrupt or truncated input near byte {pos}: {e}") from e


def _check_binary(path: str | Path, pos: int, block: bytes) -> None:
    at = block.find(b"\x00")
    if at >= 0:
        rec = block.rfind(b"\n>", 0, at)
        raise FastaError(
            f"{path}: binary content (NUL byte) at byte {pos + at}, in the record starting at "
            f"byte {pos + rec + 1 if rec >= 0 else pos}"
        )


def _gather(lines: pa.Array, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The bytes of the selected lines back to back, and their offsets (shape (k + 1,))."""
    picked = lines.filter(pa.array(mask))
    offsets = np.frombuffer(picked.buffers()[1], dtype=np.int32)[: len(picked) + 1]
    data = picked.buffers()[2]
    if data is None or len(picked) == 0:
        return np.zeros(0, dtype=np.uint8), np.zeros(1, dtype=np.int64)
    start = offsets[0]
    return (
        np.frombuffer(data, dtype=np.uint8)[start : offsets[-1]],
        (offsets - start).astype(np.int64),
    )


def _record_lengths(
    buf: np.ndarray, nl: np.ndarray, hdr_start: np.ndarray, hdr_end: np.ndarray, kept: int
) -> np.ndarray | None:
    """Sequence bytes per record from the line structure alone, if newlines are the only
    bytes dropped from sequence lines (else None)."""
    n = len(buf)
    nxt = np.append(hdr_start[1:], n)
    # newlines from the end of each header line up to the next header
    nl_before = np.searchsorted(nl, hdr_start)
    nl_count = np.diff(np.append(nl_before, len(nl)))
    raw = nxt - hdr_end - nl_count
    crlf = buf[np.maximum(hdr_end, 0)[hdr_end < n]] == ord("\r")
    raw[: len(crlf)] -= crlf  # the header's own '\r' (hdr_end points at it)
    return raw if int(raw.sum()) == kept else None


def _strings(data: np.ndarray, offsets: np.ndarray) -> pa.StringArray:
    """Build a StringArray over `data` bytes with int32 `offsets` (len n+1), zero-copy."""
    n = len(offsets) - 1
    return pa.StringArray.from_buffers(
        n, pa.py_buffer(offsets.astype(np.int32)), pa.py_buffer(np.ascontiguousarray(data))
    )


def _safe_utf8(data: np.ndarray, offsets: np.ndarray) -> pa.StringArray:
    arr = _strings(data, offsets)
    if (data >= 0x80).any():
        try:
            arr.validate(full=True)
        except pa.ArrowInvalid:  # rare: decode record by record, replacing bad bytes
            raw = data.tobytes()
            arr = pa.array(
                [
                    raw[a:b].decode("utf-8", "replace")
                    for a, b in zip(offsets[:-1], offsets[1:], strict=False)
                ],
                pa.string(),
            )
    return arr


def _part(lists: pa.ListArray, k: int) -> pa.Array:
    """Element k of each list, null where the list is shorter (no Python loop)."""
    offs = lists.offsets.to_numpy()
    lens = np.diff(offs)
    idx = pa.array(offs[:-1] + k, mask=lens <= k)
    return lists.flatten().take(idx)


def _split(arr: pa.Array, sep: str, k: int, regex: bool = False) -> list[pa.Array]:
    """Split each string at the first `k` separators; return the k+1 parts (null if absent)."""
    split = pc.split_pattern_regex if regex else pc.split_pattern
    lists = split(arr, sep, max_splits=k)
    return [_part(lists, i) for i in range(k + 1)]


def _group(arr: pa.Array, pattern: str) -> pa.Array:
    """The single named group of `pattern` searched in each string (null if no match)."""
    return pc.extract_regex(arr, pattern).field(0)


def _fields_plain(headers: pa.Array) -> dict[str, pa.Array]:
    first, rest = _split(headers, " ", 1)
    nulls = pa.nulls(len(headers), pa.string())
    return dict(id=first, name=nulls, description=rest, taxon=nulls, taxid=nulls)


def _fields_uniprot(headers: pa.Array) -> dict[str, pa.Array]:
    first, rest = _split(headers, " ", 1)
    _, acc, name = _split(first, "|", 2)
    desc, tail = _split(pc.binary_join_element_wise(" ", pc.fill_null(rest, ""), ""), " OS=", 1)
    return dict(
        id=acc,
        name=name,
        description=desc,
        taxon=_split(tail, r" [A-Z][A-Z]=", 1, regex=True)[0],
        taxid=_group(tail, r"OX=(?P<taxid>\d+)"),
    )


def _fields_uniref(headers: pa.Array) -> dict[str, pa.Array]:
    first, rest = _split(headers, " ", 1)
    rest = pc.binary_join_element_wise(" ", pc.fill_null(rest, ""), "")
    return dict(
        id=first,
        name=_group(rest, r" RepID=(?P<name>\S+)"),
        description=_split(rest, r" (?:n|Tax|TaxID|RepID)=", 1, regex=True)[0],
        taxon=_group(rest, r" Tax=(?P<taxon>[^=]*) TaxID="),
        taxid=_group(rest, r" TaxID=(?P<taxid>\d+)"),
    )


def _fields_jgi(headers: pa.Array) -> dict[str, pa.Array]:
    fields = _fields_plain(headers)
    rest = fields["description"]
    fields["name"] = _group(fields["id"], r"^(?P<name>Ga\d+)_")
    fields["taxon"] = _group(rest, r"\[(?P<taxon>[^\[\]]*)\]\s*$")
    fields["description"] = pc.replace_substring_regex(rest, r"\s*\[[^\[\]]*\]\s*$", "")
    return fields


_PARSERS = {
    "plain": _fields_plain,
    "mgnify": _fields_plain,  # MGYP accession, then attributes kept as the description
    "uniprot": _fields_uniprot,
    "uniref": _fields_uniref,
    "jgi": _fields_jgi,
}


def parse_headers(headers: pa.StringArray, header_format: HeaderFormat = "auto") -> pa.Table:
    """Parse FASTA header lines (without '>') into (id, name, description, taxon, taxid).

    Vectorized with Arrow string kernels. See the module docstring for the conventions;
    fields a convention lacks are null, and empty strings become null (except the id).
    "auto" recognises UniProt and UniRef per record and keeps the first word otherwise.
    """
    if header_format not in HEADER_FORMATS:
        raise ValueError(f"unknown header_format {header_format!r}; one of {HEADER_FORMATS}")
    if header_format != "auto":
        cols = _PARSERS[header_format](headers)
    else:
        cols = None
        for fmt, prefixes in _AUTO_PREFIX.items():
            mask = pc.starts_with(headers, prefixes[0])
            for prefix in prefixes[1:]:
                mask = pc.or_(mask, pc.starts_with(headers, prefix))
            hits = pc.sum(mask).as_py() or 0
            if hits == len(headers) and cols is None:  # the usual case: one convention a file
                cols = _PARSERS[fmt](headers)
                break
            if hits:
                cols = cols or _fields_plain(headers)
                special = _PARSERS[fmt](headers)
                cols = {k: pc.if_else(mask, special[k], v) for k, v in cols.items()}
        cols = cols or _fields_plain(headers)
    empty = pa.scalar(None, pa.string())
    out = {}
    for k, v in cols.items():
        v = pc.utf8_trim_whitespace(v)
        out[k] = v if k == "id" else pc.if_else(pc.equal(v, ""), empty, v)
    out["id"] = pc.fill_null(out["id"], "")
    out["taxid"] = pc.cast(out["taxid"], pa.int64())
    return pa.table(out)


def parse_block(
    block: bytes,
    base: int,
    *,
    dataset: str,
    source: str,
    header_format: HeaderFormat = "auto",
    lowercase: Literal["upper", "reject"] = "upper",
) -> _Block:
    """Parse one block of whole FASTA records (starting with '>') into a record batch.

    `base` is the block's offset in the input. Returns the valid rows and the reject rows.
    """
    if not block.endswith(b"\n"):
        block += b"\n"  # only the input's last block can lack it; every line now ends in \n
    buf = np.frombuffer(block, dtype=np.uint8)
    n = len(buf)
    nl = np.flatnonzero(buf == _NL)
    line_start = np.empty(len(nl), dtype=np.int64)
    line_start[0] = 0
    line_start[1:] = nl[:-1] + 1
    is_hdr = buf[line_start] == _GT  # the block starts with '>', so line 0 is a header
    hdr_line = np.flatnonzero(is_hdr)
    hdr_start = line_start[hdr_line]
    hdr_end = nl[hdr_line]
    cr = buf[hdr_end - 1] == ord("\r")
    hdr_end = hdr_end - cr
    records = len(hdr_start)

    # the block's lines as one Arrow binary array (zero-copy); filtering it gathers the
    # header lines and the sequence lines into two contiguous buffers with C++ memcpy
    lines = pa.Array.from_buffers(
        pa.binary(),
        len(nl),
        [None, pa.py_buffer(np.append(line_start, n).astype(np.int32)), pa.py_buffer(block)],
    )
    hdr_lines, hoff_full = _gather(lines, is_hdr)
    drop = np.zeros(len(hdr_lines), dtype=bool)
    drop[hoff_full[:-1]] = True  # '>'
    drop[hoff_full[1:] - 1] = True  # '\n'
    drop[hoff_full[1:][cr] - 2] = True  # '\r'
    header_bytes = hdr_lines[~drop]
    hoff = np.zeros(records + 1, dtype=np.int64)
    np.cumsum(hdr_end - hdr_start - 1, out=hoff[1:])

    # sequence bytes: bytes above 0x20 (not whitespace/newline) of the other lines
    seq_lines, soff = _gather(lines, ~is_hdr)
    keep = seq_lines > 0x20
    seq = seq_lines[keep]
    seq_len = _record_lengths(buf, nl, hdr_start, hdr_end, len(seq))
    if seq_len is None:  # whitespace inside sequence lines: count per line, then per record
        per_line = np.add.reduceat(keep.view(np.uint8), soff[:-1], dtype=np.int64)
        rec = (np.cumsum(is_hdr) - 1)[~is_hdr]
        seq_len = np.bincount(rec, weights=per_line, minlength=records).astype(np.int64)
    off = np.zeros(records + 1, dtype=np.int64)
    np.cumsum(seq_len, out=off[1:])

    # one terminal '*' per record is a stop codon: drop it
    last = off[1:] - 1
    has_seq = seq_len > 0
    star = np.zeros(records, dtype=bool)
    star[has_seq] = seq[last[has_seq]] == _STAR
    stop_removed = int(star.sum())
    if stop_removed:
        drop = np.zeros(len(seq), dtype=bool)
        drop[last[star]] = True
        seq = seq[~drop]
        off[1:] -= np.cumsum(star)
        seq_len = np.diff(off)

    reason = np.zeros(records, dtype=np.int8)  # 0 ok; see _REASONS
    # fast check: every byte an uppercase letter other than J; else find the odd ones
    clean = not np.count_nonzero((seq - np.uint8(65)) > 25) and not np.count_nonzero(seq == 74)
    odd = np.zeros(0, np.int64) if clean else np.flatnonzero(_CLASS[seq])
    lowercased = 0
    bad_pos = odd[_CLASS[seq[odd]] == 2]
    bad_rec = np.searchsorted(off, bad_pos, "right") - 1
    if len(odd):
        seq = seq.copy() if not seq.flags.writeable else seq
        low = odd[_CLASS[seq[odd]] == 1]
        rec_low = np.unique(np.searchsorted(off, low, "right") - 1)
        if lowercase == "reject":
            reason[rec_low] = 3
        else:
            seq[low] -= 32
            lowercased = len(rec_low)
        reason[bad_rec] = 2
        seq[bad_pos[seq[bad_pos] >= 0x80]] = ord("?")  # keep the buffer valid UTF-8
    reason[(seq_len == 0) & (reason == 0)] = 1

    headers = _safe_utf8(header_bytes, hoff)
    fields = parse_headers(headers, header_format)
    ids = fields.column("id").combine_chunks()
    empty_id = pc.equal(ids, "").to_numpy(zero_copy_only=False)
    reason[empty_id & (reason == 0)] = 4

    offsets = base + hdr_start
    sequences = _strings(seq, off)
    batch = pa.RecordBatch.from_arrays(
        [
            ids,
            pa.repeat(pa.scalar(dataset, pa.string()), records),
            sequences,
            pa.array(seq_len.astype(np.int32)),
            fields.column("name").combine_chunks(),
            fields.column("description").combine_chunks(),
            fields.column("taxon").combine_chunks(),
            fields.column("taxid").combine_chunks(),
            pa.array(offsets),
        ],
        schema=SEQUENCE_SCHEMA,
    )
    rejects: list[dict] = []
    bad = np.flatnonzero(reason)
    if len(bad):
        rejects = _reject_rows(bad, reason, ids, offsets, seq, off, bad_pos, bad_rec, source)
        batch = batch.filter(pa.array(reason == 0))
    return _Block(batch, rejects, records, lowercased, stop_removed)


_REASONS = {1: "empty_sequence", 2: "invalid_characters", 3: "lowercase", 4: "empty_id"}


def _reject_rows(bad, reason, ids, offsets, seq, off, bad_pos, bad_rec, source) -> list[dict]:
    """Reject dicts for the (few) refused records; this loop runs only over refusals."""
    rows = []
    id_list = ids.take(pa.array(bad)).to_pylist()
    for r, rid in zip(bad.tolist(), id_list, strict=False):
        code = int(reason[r])
        where = f"byte {int(offsets[r])}"
        if code == 2:
            lo, hi = np.searchsorted(bad_rec, [r, r + 1])
            chars = sorted({chr(c) for c in seq[bad_pos[lo:hi]].tolist()})
            first = int(bad_pos[lo] - off[r]) + 1
            detail = f"characters {''.join(chars)!r} not in {ALPHABET} (first at residue {first})"
        elif code == 3:
            detail = "lowercase residues (lowercase='reject')"
        elif code == 1:
            detail = "header with no sequence"
        else:
            detail = "header has no id"
        rows.append(
            {
                "stage": "ingest",
                "source": source,
                "record": rid or where,
                "reason": _REASONS[code],
                "detail": f"{detail}; record at {where}",
            }
        )
    return rows


def _rejects_path(out: Path) -> Path:
    return out.with_name(out.name + ".rejects.parquet")


def write_rejects(out: Path, summary: dict, rejects: list[dict]) -> None:
    """Save an ingest's summary and reject rows next to its finished shard."""
    table = pa.Table.from_pylist(rejects, schema=REJECT_SCHEMA).replace_schema_metadata(
        {"summary": json.dumps(summary)}
    )
    write_table(table, _rejects_path(out))


def read_rejects(out: str | Path) -> tuple[dict, list[dict]]:
    """The summary and reject rows saved next to a finished shard by `ingest_fasta`."""
    table = pq.read_table(_rejects_path(Path(out)))
    summary = json.loads(table.schema.metadata[b"summary"])
    return summary, table.to_pylist()


def ingest_fasta(
    path: str | Path,
    out: str | Path,
    *,
    dataset: str,
    header_format: HeaderFormat = "auto",
    lowercase: Literal["upper", "reject"] = "upper",
    byte_range: tuple[int, int] | None = None,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    members: Sequence[str] = (),
) -> tuple[dict, list[dict]]:
    """Ingest one FASTA/FASTA.gz input (or one byte range of it) into the Parquet shard `out`.

    One array task's unit of work. Idempotent: when `out` exists, returns the saved summary
    and rejects without reading the input. The shard (schema `SEQUENCE_SCHEMA`, rows in input
    order) and its sidecar `<out>.rejects.parquet` appear only when complete.
    An archive (`is_archive`: .tar, .tar.gz, ...) is read member by member: `members` are the
    globs of the members to read (default `FASTA_MEMBERS`); see the module docstring.
    Returns (summary counts, reject rows). Raises FastaError for unreadable input.
    """
    path, out = Path(path), Path(out)
    if is_done(out) and _rejects_path(out).exists():
        summary, rejects = read_rejects(out)
        return {**summary, "skipped": True}, rejects
    source = str(path)
    counts = dict(records=0, lowercased=0, stop_removed=0)
    rejects: list[dict] = []
    drop: list[tuple[int, int]] = []  # archives: offsets of rows of broken members

    def add(base: int, block: bytes, where: str) -> None:
        parsed = parse_block(block, base, dataset=dataset, source=where,
                             header_format=header_format, lowercase=lowercase)  # fmt: skip
        writer.write(parsed.batch)
        rejects.extend(parsed.rejects)
        counts["records"] += parsed.records
        counts["lowercased"] += parsed.lowercased
        counts["stop_removed"] += parsed.stop_removed

    with ShardWriter(out, SEQUENCE_SCHEMA) as writer:
        if is_archive(path):
            if byte_range is not None:
                raise FastaError(f"{path}: byte ranges need an uncompressed FASTA file")
            counts |= _ingest_archive(path, members or FASTA_MEMBERS, block_bytes, add,
                                      rejects, drop)  # fmt: skip
        else:
            for base, block in iter_blocks(path, block_bytes, byte_range):
                add(base, block, source)

        def finish(tmp: Path) -> tuple[Path, int] | None:
            # rows of broken members, then repeated ids, are dropped from the finished
            # temporary file, before the rename
            current, removed = tmp, 0
            if drop:
                current, removed = _drop_from_offsets(tmp, drop)
            dedup = _drop_duplicate_ids(current, source, rejects)
            if dedup is not None:
                if current != tmp:
                    current.unlink()
                current, removed = dedup[0], removed + dedup[1]
            return (current, removed) if current != tmp else None

        removed = writer.close(finish)
    summary = {
        "source": source,
        "dataset": dataset,
        "shard": str(out),
        **counts,
        "written": writer.rows - removed,
        "rejected": len(rejects),
        "skipped": False,
    }
    write_rejects(out, summary, rejects)
    return summary, rejects


def _ingest_archive(path, patterns, block_bytes, add, rejects, drop) -> dict:  # type: ignore[no-untyped-def]
    """Stream the FASTA members of an archive through `add(offset, block, source)`.

    Offsets run on through the members' uncompressed bytes. A member that is not FASTA, or
    the member in which the archive breaks, gets a reject row and the offsets of its rows
    go to `drop` as [start, end). Returns the archive's counts (members read, skipped and
    rejected)."""
    stats = WalkStats()
    counts = {"members": 0, "members_skipped": 0, "members_rejected": 0}
    offset = 0
    reading: str | None = None  # the member being read
    try:
        for m in iter_members(path, patterns, stats=stats):
            counts["members"] += 1
            reading, start, end = m.name, offset, offset
            try:
                with m.open() as raw:
                    gz = raw.peek(2)[:2] == b"\x1f\x8b"
                    stream = gzip.GzipFile(fileobj=raw) if gz else raw
                    for base, block in stream_blocks(stream, m.source, block_bytes):
                        add(start + base, block, m.source)
                        end = start + base + len(block)
            except FastaError as e:
                counts["members_rejected"] += 1
                drop.append((start, end + 1))
                rejects.append(_archive_reject(path, m.name, "not_fasta", str(e)))
            reading, offset = None, end + 1  # the next member's rows come after this one's
    except ArchiveError as e:
        if reading is not None:  # broke inside a member: its rows go
            counts["members_rejected"] += 1
            drop.append((start, np.iinfo(np.int64).max))
        rejects.append(_archive_reject(path, e.member or "", "truncated_archive", str(e)))
    counts["members_skipped"] = stats.skipped
    if not stats.selected and not counts["members_rejected"]:
        rejects.append(_archive_reject(path, "", "no_fasta_members",
                                       f"no member matches {list(patterns)}; "
                                       f"{stats.members} file(s) in the archive"))  # fmt: skip
    return counts


def _archive_reject(archive: str | Path, member: str, reason: str, detail: str) -> dict:
    return {"stage": "ingest", "source": f"{archive}:{member}" if member else str(archive),
            "record": member or Path(archive).name, "reason": reason, "detail": detail}  # fmt: skip


def _drop_from_offsets(tmp: Path, ranges: list[tuple[int, int]]) -> tuple[Path, int]:
    """The finished temporary shard without the rows whose offset lies in one of the
    [start, end) ranges (the rows of broken archive members), row group by row group.
    Returns (the new file, rows removed)."""
    out, removed = tmp_path(tmp), 0
    pf = pq.ParquetFile(tmp)
    writer = parquet_writer(out, pf.schema_arrow)
    try:
        for i in range(pf.num_row_groups):
            group = pf.read_row_group(i)
            offsets = group.column("offset").to_numpy()
            bad = np.zeros(len(offsets), dtype=bool)
            for lo, hi in ranges:
                bad |= (offsets >= lo) & (offsets < hi)
            removed += int(bad.sum())
            if not bad.all():
                writer.write_table(group.filter(pa.array(~bad)))
        writer.close()
    except BaseException:
        writer.close()
        out.unlink(missing_ok=True)
        raise
    finally:
        pf.close()
    return out, removed


def _drop_duplicate_ids(tmp: Path, source: str, rejects: list[dict]) -> tuple[Path, int] | None:
    """Find repeated ids in the finished temporary shard with DuckDB (out-of-core).

    Keeps the first occurrence. If any id repeats, writes the shard again without the repeats
    and returns (that file, rows removed); extends `rejects` in place.
    """
    src = {"src": str(tmp)}
    repeats = """
        SELECT id, "offset", min("offset") OVER (PARTITION BY id) AS first_offset
        FROM read_parquet($src)
        WHERE id IN (SELECT id FROM read_parquet($src) GROUP BY id HAVING count(*) > 1)
        QUALIFY "offset" > first_offset"""
    con = connect()
    try:
        # the common case first: one grouping pass, under the connection's memory limit
        (unique,) = con.execute("SELECT count(*) = count(DISTINCT id) FROM read_parquet($src)",
                                src).fetchone()  # fmt: skip
        if unique:
            return None
        dups = con.execute(repeats + ' ORDER BY "offset"', src).fetchall()
        if not dups:
            return None
        rejects += [
            {
                "stage": "ingest",
                "source": source,
                "record": rid,
                "reason": "duplicate_id",
                "detail": f"id first seen at byte {first}; repeat at byte {offset} dropped",
            }
            for rid, offset, first in dups
        ]
        dedup = tmp_path(tmp)
        # COPY's target cannot be bound: it goes in quoted by sql_path
        con.execute(
            f"""COPY (SELECT * FROM read_parquet($src)
                      WHERE "offset" NOT IN (SELECT "offset" FROM ({repeats}))
                      ORDER BY "offset")
                TO {sql_path(dedup)} (FORMAT parquet, COMPRESSION zstd)""",  # noqa: S608
            src,
        )
        return dedup, len(dups)
    finally:
        con.close()


def fasta_byte_ranges(path: str | Path, n: int) -> list[tuple[int, int]]:
    """Cut an uncompressed FASTA file into `n` byte ranges that start at record boundaries.

    Deterministic; ranges cover the file without overlap (some may be empty for small files).
    Each is a unit for `ingest_fasta(..., byte_range=...)`.
    """
    path = Path(path)
    with open(path, "rb") as f:
        if f.read(2) == b"\x1f\x8b":
            raise FastaError(f"{path}: byte ranges need an uncompressed file; use split_fasta")
        size = path.stat().st_size
        cuts = [0]
        for k in range(1, n):
            target = max(k * size // n, cuts[-1])
            cuts.append(_next_record(f, target, size))
        cuts.append(size)
    return list(zip(cuts[:-1], cuts[1:], strict=False))


def _next_record(f, target: int, size: int) -> int:
    """Offset of the first record start ('>' at a line start) at or after `target`."""
    if target == 0:
        return 0
    pos = target - 1
    while pos < size:
        f.seek(pos)
        chunk = f.read(1 << 20)
        at = chunk.find(b"\n>")
        if at >= 0:
            return pos + at + 1
        if len(chunk) < 2:
            break
        pos += len(chunk) - 1
    return size


def split_fasta(
    path: str | Path, out_dir: str | Path, n_shards: int, block_bytes: int = 4 << 20
) -> list[Path]:
    """Split any FASTA/FASTA.gz into `n_shards` plain FASTA files in one streaming pass.

    Blocks of whole records (about `block_bytes` each) go round-robin to the shards, so the
    split is deterministic and the shards are balanced. Files are named
    ``<stem>.<k>-of-<n>.fasta`` and all appear together at the end (idempotent: skipped
    when all exist). Raises FastaError for unreadable input.
    """
    path, out_dir = Path(path), Path(out_dir)
    stem = path.name.removesuffix(".gz").rsplit(".", 1)[0]
    outs = [out_dir / f"{stem}.{k:05d}-of-{n_shards:05d}.fasta" for k in range(n_shards)]
    if all(o.exists() for o in outs):
        return outs
    out_dir.mkdir(parents=True, exist_ok=True)
    tmps = [tmp_path(o) for o in outs]
    files = [open(t, "wb") for t in tmps]
    try:
        for i, (_, block) in enumerate(iter_blocks(path, block_bytes)):
            files[i % n_shards].write(block if block.endswith(b"\n") else block + b"\n")
        for f in files:
            f.close()
        for t, o in zip(tmps, outs, strict=False):
            t.replace(o)
    finally:
        for f, t in zip(files, tmps, strict=False):
            f.close()
            if t.exists():
                t.unlink()
    return outs


def write_fasta(tables: pa.Table | list[pa.Table], out: str | Path) -> Path:
    """Write (id, sequence) rows as FASTA ('>id' lines, one sequence line), atomically.

    Built with Arrow string kernels, no Python loop over rows.
    """
    tables = [tables] if isinstance(tables, pa.Table) else tables
    with atomic_path(out) as tmp, open(tmp, "wb") as f:
        for table in tables:
            for batch in table.select(["id", "sequence"]).to_batches(1 << 16):
                f.write(fasta_bytes(batch))
    return Path(out)


def fasta_bytes(batch: pa.RecordBatch) -> memoryview:
    """The FASTA text ('>id' line, one sequence line) of a batch's `id` and `sequence`
    columns, built with Arrow string kernels (no Python loop over rows)."""
    text = pc.binary_join_element_wise(
        ">", batch.column("id"), "\n", batch.column("sequence"), "\n", ""
    )
    # the joined strings lie back to back in the data buffer: hand it over whole
    offs = np.frombuffer(text.buffers()[1], np.int32)
    a, b = offs[text.offset], offs[text.offset + len(text)]
    return memoryview(text.buffers()[2])[a:b]
