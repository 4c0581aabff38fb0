"""FASTA ingest: real UniProt sequences, header conventions, rejects, corrupt input, sharding."""

from __future__ import annotations

import gzip
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from esm3.data.fasta import (
    SEQUENCE_SCHEMA,
    FastaError,
    fasta_byte_ranges,
    ingest_fasta,
    parse_headers,
    read_rejects,
    split_fasta,
    write_fasta,
)
from tests.realdata import uniprot_fasta


def _reference_records(path: Path) -> list[tuple[str, str]]:
    """(accession, sequence) by the simplest possible independent reader."""
    out, header, parts = [], None, []
    with gzip.open(path, "rt") as f:
        for line in f:
            if line.startswith(">"):
                if header is not None:
                    out.append((header, "".join(parts)))
                header, parts = line[1:].split("|")[1], []
            else:
                parts.append(line.strip())
    out.append((header, "".join(parts)))
    return out


def _write(tmp_path: Path, text: str | bytes, name: str = "in.fasta") -> Path:
    p = tmp_path / name
    p.write_bytes(text.encode() if isinstance(text, str) else text)
    return p


def _no_leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture(scope="module")
def real_records() -> list[tuple[str, str]]:
    return _reference_records(uniprot_fasta())


def test_real_uniprot_ingest_matches_reference_reader(tmp_path, real_records):
    out = tmp_path / "db.parquet"
    summary, rejects = ingest_fasta(uniprot_fasta(), out, dataset="uniprot")
    table = pq.read_table(out)
    assert table.schema.equals(SEQUENCE_SCHEMA)
    assert summary["records"] == summary["written"] == len(real_records) == 20_000
    assert rejects == []
    assert list(zip(table["id"].to_pylist(), table["sequence"].to_pylist(), strict=True)) == (
        real_records
    )
    assert table["length"].to_pylist() == [len(s) for _, s in real_records]
    first = table.slice(0, 1).to_pylist()[0]
    assert first["name"] == "W0FSK4_9FLAV"
    assert first["description"] == "Genome polyprotein (Fragment)"
    assert first["taxon"] == "Dengue virus 3"
    assert first["dataset"] == "uniprot" and first["offset"] == 0


def test_layout_does_not_change_the_records(tmp_path, real_records):
    """60-column wrapping, CRLF line ends and tiny blocks give the same rows."""
    recs = real_records[:300]
    flat = "".join(f">sp|{i}|N_{i} d\n{s}\n" for i, s in recs)
    wrapped = "".join(
        f">sp|{i}|N_{i} d\r\n" + "".join(s[k : k + 60] + "\r\n" for k in range(0, len(s), 60))
        for i, s in recs
    )
    a, _ = ingest_fasta(_write(tmp_path, flat, "a.fa"), tmp_path / "a.parquet", dataset="u")
    b, _ = ingest_fasta(
        _write(tmp_path, wrapped, "b.fa"), tmp_path / "b.parquet", dataset="u", block_bytes=4096
    )
    ta, tb = (pq.read_table(tmp_path / f"{x}.parquet").drop(["offset"]) for x in "ab")
    assert ta.equals(tb)
    assert ta["id"].to_pylist() == [i for i, _ in recs]
    assert ta["sequence"].to_pylist() == [s for _, s in recs]


@pytest.mark.parametrize(
    ("fmt", "header", "expected"),
    [
        (
            "auto",
            "sp|P04637|P53_HUMAN Cellular tumor antigen p53 OS=Homo sapiens OX=9606 GN=TP53 "
            "PE=1 SV=4",
            ("P04637", "P53_HUMAN", "Cellular tumor antigen p53", "Homo sapiens", 9606),
        ),
        (
            "auto",
            "tr|A0A0B4J2F0|A0A0B4J2F0_HUMAN Protein PIGBOS1 OS=Homo sapiens OX=9606 PE=1 SV=1",
            ("A0A0B4J2F0", "A0A0B4J2F0_HUMAN", "Protein PIGBOS1", "Homo sapiens", 9606),
        ),
        (
            "auto",
            "UniRef90_P12345 Aspartate aminotransferase n=3 Tax=Oryctolagus cuniculus "
            "TaxID=9986 RepID=AATM_RABIT",
            (
                "UniRef90_P12345",
                "AATM_RABIT",
                "Aspartate aminotransferase",
                "Oryctolagus cuniculus",
                9986,
            ),
        ),
        (
            "auto",
            "MGYP000050883416 PL=00 UP=0 BIOMES=0000000011000",
            ("MGYP000050883416", None, "PL=00 UP=0 BIOMES=0000000011000", None, None),
        ),
        (
            "jgi",
            "Ga0123456_1000011 hypothetical protein [Lake sediment metagenome]",
            (
                "Ga0123456_1000011",
                "Ga0123456",
                "hypothetical protein",
                "Lake sediment metagenome",
                None,
            ),
        ),
        ("auto", "contig_7 some free text", ("contig_7", None, "some free text", None, None)),
        ("auto", "lonely", ("lonely", None, None, None, None)),
    ],
)
def test_header_conventions(fmt, header, expected):
    row = parse_headers(pa.array([header]), fmt).to_pylist()[0]
    assert (row["id"], row["name"], row["description"], row["taxon"], row["taxid"]) == expected


def test_auto_detects_per_record():
    rows = parse_headers(
        pa.array(["sp|P1|A_B x OS=Y", "UniRef50_Q9 y n=1 Tax=Z TaxID=7 RepID=Q", "foo bar"])
    ).to_pylist()
    assert [r["id"] for r in rows] == ["P1", "UniRef50_Q9", "foo"]
    assert [r["taxon"] for r in rows] == ["Y", "Z", None]


def test_rejects_bad_records_and_carries_on(tmp_path):
    text = (
        ">ok1 fine\nMKTAYIAK\n"
        ">bad1 digits\nMKT1AYJ\n"
        ">empty1 header only\n"
        ">lower1\nmktayIAK\n"
        ">stop1\nMKTAY*\n"
        ">stop2 internal stop\nMK*TAY\n"
        ">ok1 duplicate id\nAAAA\n"
        "> \nMKV\n"
        ">last_empty\n"
    )
    out = tmp_path / "x.parquet"
    summary, rejects = ingest_fasta(_write(tmp_path, text), out, dataset="d")
    rows = pq.read_table(out).to_pylist()
    assert [(r["id"], r["sequence"]) for r in rows] == [
        ("ok1", "MKTAYIAK"),
        ("lower1", "MKTAYIAK"),  # lowercase is upper-cased by default
        ("stop1", "MKTAY"),  # a terminal '*' is a stop codon
    ]
    got = {(r["record"], r["reason"]) for r in rejects}
    assert got == {
        ("bad1", "invalid_characters"),
        ("empty1", "empty_sequence"),
        ("stop2", "invalid_characters"),
        ("ok1", "duplicate_id"),
        ("byte " + str(text.index("> \n")), "empty_id"),
        ("last_empty", "empty_sequence"),
    }
    bad = next(r for r in rejects if r["record"] == "bad1")
    assert "'1J'" in bad["detail"] and "residue 4" in bad["detail"]
    assert all(
        r["stage"] == "ingest" and r["source"] == str(tmp_path / "in.fasta") for r in rejects
    )
    assert summary["records"] == 9 and summary["written"] == 3 and summary["rejected"] == 6
    assert summary["lowercased"] == 1 and summary["stop_removed"] == 1


def test_lowercase_reject_mode(tmp_path):
    out = tmp_path / "x.parquet"
    _, rejects = ingest_fasta(
        _write(tmp_path, ">a\nMKV\n>b\nMkV\n"), out, dataset="d", lowercase="reject"
    )
    assert pq.read_table(out)["id"].to_pylist() == ["a"]
    assert [(r["record"], r["reason"]) for r in rejects] == [("b", "lowercase")]


def test_idempotent_rerun_returns_saved_rejects(tmp_path):
    src = _write(tmp_path, ">a\nMKV\n>b\nMK1\n")
    out = tmp_path / "x.parquet"
    first = ingest_fasta(src, out, dataset="d")
    src.write_text("garbage that would fail")  # not read again
    second = ingest_fasta(src, out, dataset="d")
    assert second[0]["skipped"] and not first[0]["skipped"]
    assert second[1] == first[1] and read_rejects(out)[1] == first[1]


def _truncated_gz(tmp_path: Path) -> Path:
    data = uniprot_fasta().read_bytes()
    return _write(tmp_path, data[: len(data) // 3], "trunc.fasta.gz")


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (_truncated_gz, "corrupt or truncated"),
        (lambda t: _write(t, bytes(range(256)) * 40, "blob.bin"), "not a FASTA file"),
        (lambda t: _write(t, b">a\nMKV\n>b\nMK\x00\x01V\n", "nul.fa"), "binary content"),
        (lambda t: _write(t, b"", "empty.fa"), "empty file"),
        (lambda t: _write(t, gzip.compress(b""), "empty.fa.gz"), "empty file"),
        (lambda t: _write(t, "just some text\n", "text.fa"), "no '>' header"),
    ],
)
def test_corrupt_input_is_a_clear_error_and_leaves_nothing(tmp_path, make, message):
    src = make(tmp_path)
    outdir = tmp_path / "out"
    outdir.mkdir()
    with pytest.raises(FastaError, match=message) as err:
        ingest_fasta(src, outdir / "x.parquet", dataset="d", block_bytes=1 << 16)
    assert str(src) in str(err.value)
    assert _no_leftovers(outdir) == []


def test_byte_ranges_cover_the_file_exactly(tmp_path):
    raw = gzip.decompress(uniprot_fasta().read_bytes())[:2_000_000]
    raw = raw[: raw.rfind(b"\n>") + 1]
    src = _write(tmp_path, raw)
    ranges = fasta_byte_ranges(src, 7)
    assert ranges[0][0] == 0 and ranges[-1][1] == len(raw)
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
    assert all(raw[a : a + 1] == b">" for a, b in ranges if b > a)
    whole, _ = ingest_fasta(src, tmp_path / "whole.parquet", dataset="d")
    parts = []
    for k, r in enumerate(ranges):
        ingest_fasta(src, tmp_path / f"p{k}.parquet", dataset="d", byte_range=r)
        parts.append(pq.read_table(tmp_path / f"p{k}.parquet"))
    assert pa.concat_tables(parts).equals(pq.read_table(tmp_path / "whole.parquet"))
    assert fasta_byte_ranges(src, 7) == ranges  # deterministic


def test_split_fasta_is_deterministic_and_complete(tmp_path):
    shards = split_fasta(uniprot_fasta(), tmp_path / "a", 3, block_bytes=1 << 20)
    again = split_fasta(uniprot_fasta(), tmp_path / "b", 3, block_bytes=1 << 20)
    assert [p.read_bytes() for p in shards] == [p.read_bytes() for p in again]
    assert [p.name for p in shards] == [f"DB.{k:05d}-of-00003.fasta" for k in range(3)]
    ids = []
    for k, p in enumerate(shards):
        ingest_fasta(p, tmp_path / f"s{k}.parquet", dataset="d")
        ids += pq.read_table(tmp_path / f"s{k}.parquet")["id"].to_pylist()
    whole = [i for i, _ in _reference_records(uniprot_fasta())]
    assert sorted(ids) == sorted(whole) and min(p.stat().st_size for p in shards) > 0


def test_write_fasta_round_trip(tmp_path):
    table = pa.table({"id": ["a", "b"], "sequence": ["MKV", "ACDE"]})
    out = write_fasta(table, tmp_path / "x.fasta")
    assert out.read_text() == ">a\nMKV\n>b\nACDE\n"
