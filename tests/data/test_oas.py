"""OAS data units (unpaired and paired) read as OAS publishes them, against the same
sequences read from plain FASTA; bad units as rejects."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from esm3.data.fasta import SEQUENCE_SCHEMA, ingest_fasta, read_rejects
from esm3.data.oas import OAS_SCHEMA, OasError, ingest_oas, read_unit_head, unit_name
from tests.bundles import (
    OAS_COLUMNS,
    oas_metadata,
    paired_unit,
    unpaired_unit,
    write_oas_unit,
)
from tests.realdata import described_sequences


def _sequences(n: int, skip: int = 0) -> list[str]:
    """Real protein sequences (UniProt, mmseqs2-examples) standing in for V domains."""
    return [seq for _, seq in described_sequences(n, skip)]


# planted: a letter outside the alphabet, an empty alignment, soft-masked letters, a stop
BAD = {3: "QVQLJESGG", 7: "", 11: "evqlVESGGG", 12: "QVQLQESG*"}


def _fasta(path: Path, records: list[tuple[str, str]]) -> Path:
    path.write_text("".join(f">{i}\n{s}\n" for i, s in records))
    return path


def _key(table) -> list[tuple]:
    return list(zip(*(table[c].to_pylist() for c in ("id", "sequence", "length")), strict=True))


def _reasons(rejects: list[dict]) -> list[tuple[str, str]]:
    return [(r["record"], r["reason"]) for r in rejects]


def test_unpaired_units_equal_the_same_records_from_plain_fasta(tmp_path):
    seqs = _sequences(300)
    for i, s in BAD.items():
        seqs[i] = s
    units = [
        unpaired_unit(tmp_path / "SRR9179275_1_Heavy_IGHG.csv.gz",
                      oas_metadata("SRR9179275", "Heavy", "IGHG"), seqs[:200]),
        unpaired_unit(tmp_path / "SRR9179276_1_Light_Bulk.csv.gz",
                      oas_metadata("SRR9179276", "Light", "Bulk"), seqs[200:]),
    ]  # fmt: skip
    ids = []
    for unit, chunk, chain, iso in ((units[0], seqs[:200], "Heavy", "IGHG"),
                                    (units[1], seqs[200:], "Light", "Bulk")):  # fmt: skip
        out = tmp_path / f"{unit_name(unit)}.parquet"
        # small CSV blocks: the unit is read in several batches, rows numbered across them
        summary, rejects = ingest_oas(unit, out, dataset="oas", block_bytes=16 << 10)
        table = pq.read_table(out)
        assert table.schema.equals(OAS_SCHEMA)
        plain = _fasta(tmp_path / f"{unit_name(unit)}.fasta",
                       [(f"{unit_name(unit)}:{r}", s) for r, s in enumerate(chunk)])  # fmt: skip
        ref_summary, ref_rejects = ingest_fasta(plain, tmp_path / "ref.parquet", dataset="oas",
                                                header_format="plain")  # fmt: skip
        ref = pq.read_table(tmp_path / "ref.parquet")
        (tmp_path / "ref.parquet").unlink()
        (tmp_path / "ref.parquet.rejects.parquet").unlink()
        assert _key(table) == _key(ref) and len(table) > 0
        assert _reasons(rejects) == _reasons(ref_rejects)
        assert summary["written"] == ref_summary["written"] and summary["rows"] == len(chunk)
        assert summary["paired"] is False
        # the unit's metadata as columns, the row it came from
        rows = table.to_pylist()
        assert {r["chain"] for r in rows} == {chain} and {r["isotype"] for r in rows} == {iso}
        assert {(r["species"], r["taxon"], r["study"]) for r in rows} == {
            ("human", "human", "Nielsen et al., 2019")
        }
        assert all(r["id"] == f"{r['unit']}:{r['row']}" and r["offset"] == r["row"] for r in rows)
        assert rows[0]["run"] == unit_name(unit).split("_")[0]
        ids += [r["id"] for r in rows]
    assert len(ids) == len(set(ids))  # unique across units: unit name + row
    # the planted records are refused with the reason FASTA ingest gives, naming the row
    summary, rejects = read_rejects(tmp_path / f"{unit_name(units[0])}.parquet")
    assert _reasons(rejects) == [("SRR9179275_1_Heavy_IGHG:3", "invalid_characters"),
                                 ("SRR9179275_1_Heavy_IGHG:7", "empty_sequence")]  # fmt: skip
    assert rejects[0]["detail"].endswith("data row 3")
    assert summary["lowercased"] == 1 and summary["stop_removed"] == 1


def test_paired_unit_gives_heavy_and_light_records_of_each_row(tmp_path):
    seqs = _sequences(40, skip=500)
    pairs = list(zip(seqs[0::2], seqs[1::2], strict=True))
    pairs[5] = (pairs[5][0], "")  # a pair whose light chain has no alignment
    meta = oas_metadata("1279049", "Paired", "All")
    isotypes = ["IGHG", "IGHM", ""] + ["IGHA"] * (len(pairs) - 3)
    unit = paired_unit(tmp_path / "1279049_1_Paired_All.csv.gz", meta, pairs, isotypes)
    summary, rejects = ingest_oas(unit, tmp_path / "p.parquet", dataset="oas")
    table = pq.read_table(tmp_path / "p.parquet")
    plain = _fasta(
        tmp_path / "p.fasta",
        [(f"1279049_1_Paired_All:{r}:{c}", s) for r, (h, lt) in enumerate(pairs)
         for c, s in (("heavy", h), ("light", lt))],
    )  # fmt: skip
    ingest_fasta(plain, tmp_path / "ref.parquet", dataset="oas", header_format="plain")
    assert _key(table) == _key(pq.read_table(tmp_path / "ref.parquet"))
    assert summary["paired"] is True and summary["rows"] == len(pairs)
    assert _reasons(rejects) == [("1279049_1_Paired_All:5:light", "empty_sequence")]
    rows = table.to_pylist()
    assert [r["chain"] for r in rows[:4]] == ["Heavy", "Light", "Heavy", "Light"]
    assert [r["offset"] for r in rows[:4]] == [0, 1, 2, 3]
    # heavy chains carry the row's Isotype_heavy (the unit's when empty); light the unit's
    assert [r["isotype"] for r in rows[:6]] == ["IGHG", "All", "IGHM", "All", "All", "All"]
    # the pair is recoverable: same unit and row
    by_row: dict[int, list[str]] = {}
    for r in rows:
        by_row.setdefault(r["row"], []).append(r["chain"])
    assert by_row[0] == ["Heavy", "Light"] and by_row[5] == ["Heavy"]
    assert {r["species"] for r in rows} == {"human"} and {r["run"] for r in rows} == {"1279049"}


def test_unit_head_reads_quoted_and_bare_json(tmp_path):
    meta = oas_metadata("ERR220430", "Heavy", "IGHE")
    unit = unpaired_unit(tmp_path / "ERR220430_Heavy_IGHE.csv.gz", meta, ["EVQLVESGG"])
    assert gzip.open(unit, "rt").readline().startswith('"{""Run"": ""ERR220430""')
    got, header, problem = read_unit_head(unit)
    assert (got, header, problem) == (meta, OAS_COLUMNS, "")
    bare = tmp_path / "bare.csv.gz"
    bare.write_bytes(gzip.compress((json.dumps(meta) + "\nsequence_alignment_aa\nEVQL\n").encode()))
    assert read_unit_head(bare)[0] == meta
    s, _ = ingest_oas(bare, tmp_path / "bare.parquet", dataset="oas")
    assert s["written"] == 1


def test_bad_units_are_rejects_and_the_others_complete(tmp_path):
    meta = oas_metadata("SRR1", "Heavy", "IGHG")
    no_aa = write_oas_unit(tmp_path / "SRR1_Heavy_IGHG.csv.gz", meta,
                           [c for c in OAS_COLUMNS if c != "sequence_alignment_aa"],
                           [{"sequence": "CAGGTG", "v_call": "IGHV3-23*01"}])  # fmt: skip
    not_json = tmp_path / "SRR2_Heavy_IGHG.csv.gz"
    not_json.write_bytes(gzip.compress(b"Run,Chain\nsequence_alignment_aa\nEVQL\n"))
    empty = tmp_path / "SRR3_Heavy_IGHG.csv.gz"
    empty.write_bytes(gzip.compress(b""))
    good = unpaired_unit(tmp_path / "SRR4_Heavy_IGHG.csv.gz", meta, _sequences(5))
    expect = {no_aa: "missing_column", not_json: "bad_metadata", empty: "empty_unit"}
    for unit, reason in expect.items():
        out = tmp_path / f"{unit_name(unit)}.parquet"
        summary, rejects = ingest_oas(unit, out, dataset="oas")
        assert [(r["record"], r["reason"], r["source"]) for r in rejects] == [
            (unit_name(unit), reason, str(unit))
        ]
        assert summary["written"] == 0 and pq.read_table(out).schema.equals(OAS_SCHEMA)
    assert "sequence_alignment_aa" in ingest_oas(no_aa, tmp_path / "x.parquet",
                                                 dataset="oas")[1][0]["detail"]  # fmt: skip
    summary, rejects = ingest_oas(good, tmp_path / "good.parquet", dataset="oas")
    assert summary["written"] == 5 and rejects == []
    again, _ = ingest_oas(good, tmp_path / "good.parquet", dataset="oas")
    assert again["skipped"] and again["written"] == 5


def test_truncated_unit_is_an_error_naming_the_file(tmp_path):
    unit = unpaired_unit(tmp_path / "SRR5_Heavy_IGHG.csv.gz",
                         oas_metadata("SRR5", "Heavy", "IGHG"), _sequences(400))  # fmt: skip
    raw = unit.read_bytes()
    unit.write_bytes(raw[: len(raw) * 2 // 3])
    with pytest.raises(OasError, match="SRR5_Heavy_IGHG.csv.gz"):
        ingest_oas(unit, tmp_path / "t.parquet", dataset="oas")
    assert not (tmp_path / "t.parquet").exists()


def test_oas_schema_extends_the_sequence_schema():
    assert OAS_SCHEMA.names[: len(SEQUENCE_SCHEMA)] == SEQUENCE_SCHEMA.names
    assert OAS_SCHEMA.names[len(SEQUENCE_SCHEMA) :] == [
        "unit", "row", "chain", "species", "isotype", "study", "run"
    ]  # fmt: skip


def test_oas_shards_and_fasta_shards_make_one_validation_set(tmp_path):
    """OAS shards carry more columns than FASTA ones: validation reads them by name."""
    from esm3.data.purge import select_validation

    seqs = _sequences(20, skip=900)
    unit = unpaired_unit(tmp_path / "SRR7_Heavy_IGHG.csv.gz",
                         oas_metadata("SRR7", "Heavy", "IGHG"), seqs[:10])  # fmt: skip
    ingest_oas(unit, tmp_path / "oas.parquet", dataset="oas")
    _fasta(tmp_path / "u.fasta", [(f"U{i}", s) for i, s in enumerate(seqs[10:])])
    ingest_fasta(tmp_path / "u.fasta", tmp_path / "u.parquet", dataset="uniref")
    for order in (["u", "oas"], ["oas", "u"]):
        got = select_validation([tmp_path / f"{n}.parquet" for n in order], n=3)
        assert got.num_rows == 6 and set(got["dataset"].to_pylist()) == {"oas", "uniref"}
        assert "chain" in got.column_names
