"""InterPro labels: protein2ipr and InterProScan TSV ingest, vocabulary, attachment.

There is no real protein2ipr.dat.gz in any package, so the tests write small files in its
format for real UniProt accessions of the structures and sequences at hand: P01892 (HLA-A2,
chain A of 1BD2/3PWP), P61769 (beta-2-microglobulin, chain B), P00974 (BPTI, 5PTI) and
M4KW32 (an ABC transporter from mmseqs2's example UniProt sequences).
"""

from __future__ import annotations

import gzip
import re
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from esm3.data.duck import connect
from esm3.data.interpro import (
    IPR_SCHEMA,
    Annotation,
    annotations_relation,
    attach_annotations,
    ingest_interproscan,
    ingest_protein2ipr,
    ingest_protein2ipr_lines,
    interpro_vocabulary,
    load_annotations,
    map_annotations,
    parse_protein2ipr_line,
)
from esm3.data.structures.records import read_shard
from esm3.data.structures.stages import StructureStageConfig, process_structure_shard
from tests.realdata import mda_file, uniprot_fasta

P2IPR = [
    "P00974\tIPR002223\tPancreatic trypsin inhibitor Kunitz domain\tPF00014\t39\t89",
    "P00974\tIPR002223\tPancreatic trypsin inhibitor Kunitz domain\tSM00131\t37\t90",
    "P00974\tIPR036880\tPancreatic trypsin inhibitor Kunitz domain superfamily\tG3DSA:4.10.410.10\t36\t93",
    "P01892\tIPR001039\tMHC class I, alpha chain, alpha1/alpha2\tPF00129\t25\t203",
    "P01892\tIPR003597\tImmunoglobulin C1-set\tPF07654\t210\t296",
    "P01892\tIPR010579\tMHC class I, alpha chain, C-terminal\tPF06623\t309\t365",
    "P61769\tIPR003597\tImmunoglobulin C1-set\tPF07654\t25\t111",
    "M4KW32\tIPR003439\tABC transporter-like, ATP-binding domain\tPF00005\t21\t170",
]
BAD = [
    "P61769\tIPR007110\tImmunoglobulin-like domain\tPS50835\t22",  # 5 columns
    "P61769\tIPR007110\tImmunoglobulin-like domain\tPS50835\tten\t114",  # not a number
    "P61769\tIPR007110\tImmunoglobulin-like domain\tPS50835\t114\t22",  # start > end
    "P61769\tIPRX\tImmunoglobulin-like domain\tPS50835\t22\t114",  # not an IPR id
]


@pytest.fixture
def protein2ipr(tmp_path):
    path = tmp_path / "protein2ipr.dat.gz"
    lines = P2IPR[:4] + BAD[:1] + P2IPR[4:] + BAD[1:]
    with gzip.open(path, "wt") as f:
        f.write("\n".join(lines) + "\n")
    return path


def test_protein2ipr_ingest_with_malformed_lines(protein2ipr, tmp_path):
    out = tmp_path / "ipr.parquet"
    summary, rejects = ingest_protein2ipr(protein2ipr, out)
    assert summary["rows"] == 8 and summary["malformed"] == 4 and summary["lines"] == 12
    assert [r["record"] for r in rejects] == ["line 5", "line 10", "line 11", "line 12"]
    assert rejects[0]["reason"] == "malformed" and rejects[0]["detail"] == "5 columns, expected 6"
    assert "not integers" in rejects[1]["detail"] and "start <= end" in rejects[2]["detail"]
    assert rejects[0]["source"] == str(protein2ipr) and rejects[0]["stage"] == "interpro"
    table = pq.read_table(out)
    assert table.schema.equals(IPR_SCHEMA)
    # sorted by accession (a shard's join reads only its range), input order within one
    expected = sorted((ln.split("\t") for ln in P2IPR), key=lambda f: f[0])
    assert [(r["accession"], r["ipr"], r["start"]) for r in table.to_pylist()] == [
        (f[0], f[1], int(f[4])) for f in expected
    ]
    assert {
        "accession": "P00974", "ipr": "IPR002223",
        "name": "Pancreatic trypsin inhibitor Kunitz domain", "signature": "PF00014",
        "start": 39, "end": 89,
    } in table.to_pylist()  # fmt: skip
    again = ingest_protein2ipr(protein2ipr, out)
    assert again.summary["skipped"] is True and again.rejects == rejects
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ipr.parquet", "protein2ipr.dat.gz"]


def test_ingest_keeps_only_wanted_accessions(protein2ipr, tmp_path):
    summary, _ = ingest_protein2ipr(protein2ipr, tmp_path / "o.parquet", accessions={"P61769"})
    assert summary["rows"] == 1 and summary["filtered"] == 7


def test_vocabulary(protein2ipr, tmp_path):
    ingest_protein2ipr(protein2ipr, tmp_path / "ipr.parquet")
    vocab = interpro_vocabulary([tmp_path / "ipr.parquet"]).to_pylist()
    assert [v["ipr"] for v in vocab] == sorted({x.split("\t")[1] for x in P2IPR})
    counts = {v["ipr"]: v["count"] for v in vocab}
    assert counts["IPR003597"] == 2 and counts["IPR002223"] == 2


def test_interproscan_tsv(tmp_path):
    # InterProScan 5 TSV with --iprlookup --goterms --pathways: 15 columns, or 11 when the
    # match has no InterPro entry
    rows = [
        "M4KW32\t3c1f0e7d\t377\tPfam\tPF00005\tABC transporter\t21\t170\t1.2E-30\tT\t01-02-2023"
        "\tIPR003439\tABC transporter-like, ATP-binding domain\tGO:0005524|GO:0016887\t-",
        "M4KW32\t3c1f0e7d\t377\tSMART\tSM00382\tAAA\t30\t161\t3.4E-12\tT\t01-02-2023"
        "\tIPR003593\tAAA+ ATPase domain\t-\t-",
        "M4KW32\t3c1f0e7d\t377\tMobiDBLite\tmobidb-lite\tconsensus disorder\t350\t377\t-\tT"
        "\t01-02-2023",
        "M4KW32\t3c1f0e7d\t377\tPfam\tPF00005",
    ]
    src = tmp_path / "mgnify.tsv"
    src.write_text("\n".join(rows) + "\n")
    summary, rejects = ingest_interproscan(src, tmp_path / "o.parquet")
    assert summary["rows"] == 2 and summary["no_ipr"] == 1 and summary["malformed"] == 1
    assert rejects[0]["record"] == "line 4" and "5 columns" in rejects[0]["detail"]
    got = load_annotations([tmp_path / "o.parquet"], ["M4KW32"])
    assert got == {"M4KW32": [Annotation("IPR003439", 21, 170), Annotation("IPR003593", 30, 161)]}


def test_map_annotations_through_residue_positions():
    anns = [Annotation("IPR001039", 25, 203), Annotation("IPR010579", 309, 365)]
    positions = np.arange(25, 25 + 275)  # chain residue i is UniProt position 25 + i
    assert map_annotations(anns, positions, 275) == [{"ipr": "IPR001039", "start": 1, "end": 179}]
    # duplicates from several member signatures collapse; spans clip to the sequence
    dup = [Annotation("IPR002223", 39, 89)] * 2 + [Annotation("IPR036880", 36, 93)]
    assert map_annotations(dup, None, 58) == [
        {"ipr": "IPR002223", "start": 39, "end": 58},
        {"ipr": "IPR036880", "start": 36, "end": 58},
    ]


def test_attach_to_real_uniprot_sequences(protein2ipr, tmp_path):
    ingest_protein2ipr(protein2ipr, tmp_path / "ipr.parquet")
    seqs = {}
    with gzip.open(uniprot_fasta(), "rt") as f:
        acc = None
        for line in f:
            if line.startswith(">"):
                acc = line.split("|")[1]
            elif acc in ("M4KW32", "W0FSK4"):
                seqs[acc] = seqs.get(acc, "") + line.strip()
    accs = ["M4KW32", "W0FSK4", None]
    lookup = load_annotations([tmp_path / "ipr.parquet"], [a for a in accs if a])
    out = attach_annotations(accs, [len(seqs["M4KW32"]), len(seqs["W0FSK4"]), 10], lookup)
    assert out == [[{"ipr": "IPR003439", "start": 21, "end": 170}], None, None]


@pytest.mark.skipif(shutil.which("mkdssp") is None, reason="mkdssp not installed")
def test_structures_carry_function_labels_in_chain_coordinates(protein2ipr, tmp_path):
    ingest_protein2ipr(protein2ipr, tmp_path / "ipr.parquet")
    process_structure_shard(
        [mda_file("3PWP.cif.gz"), mda_file("5PTI.cif.gz")],
        tmp_path / "s.parquet",
        StructureStageConfig("pdb"),
        annotations=[tmp_path / "ipr.parquet"],
    )
    rows = {r["id"]: r for r in read_shard(tmp_path / "s.parquet")}
    # 3PWP chain A residue 1 = P01892 position 25 (SIFTS): UniProt 25-203 -> chain 1-179
    assert rows["3PWP_A"]["annotations"] == [
        {"ipr": "IPR001039", "start": 1, "end": 179},
        {"ipr": "IPR003597", "start": 186, "end": 272},
    ]
    # beta-2-microglobulin: an extra Met numbered 0 (outside SIFTS), then residue 1 is
    # P61769 position 21, so UniProt 25-111 is chain positions 6-92
    assert rows["3PWP_B"]["annotations"] == [{"ipr": "IPR003597", "start": 6, "end": 92}]
    # 5PTI residue 1 = P00974 position 36
    assert rows["5PTI_A"]["annotations"][0] == {"ipr": "IPR036880", "start": 1, "end": 58}
    assert rows["3PWP_C"]["annotations"] is None  # the peptide has no UniProt reference


# Every kind of line the per-line reader treats specially, for the streaming reader to match:
# comments and blanks (skipped, not counted), short and long lines, each malformed value,
# values int() reads though they are not plain digits, quotes and invalid UTF-8 (kept).
ODD = [
    b"# protein2ipr, a comment",
    b"#P00974\tIPR002223\tcommented out\tPF00014\t39\t89",
    b"#a\tcomment with 2 columns",
    b"",
    b"   ",
    b"\t\t\t\t\t",
    b" \t \t\t \t\t ",
    b"P61769\tIPR007110\tImmunoglobulin-like domain\tPS50835\t22",
    b"P61769\tIPR007110\tImmunoglobulin-like domain\tPS50835\t22\t114\textra",
    b"P61769",
    b"\tIPR007110\tImmunoglobulin-like domain\tPS50835\t22\t114",
    b"P61769\tIPRX\tImmunoglobulin-like domain\tPS50835\t22\t114",
    b"P61769\tipr007110\tImmunoglobulin-like domain\tPS50835\t22\t114",
    b"P61769\tIPR07110\tImmunoglobulin-like domain\tPS50835\t22\t114",
    "P61769\tIPR٠٠٧١١٠\tArabic-Indic digits, \\d takes them\tPS50835\t22\t114".encode(),
    b"P61769\tIPR007110\tImmunoglobulin-like domain\tPS50835\tten\t114",
    b"P61769\tIPR007110\tImmunoglobulin-like domain\tPS50835\t22\t",
    b"P61769\tIPR007110\tImmunoglobulin-like domain\tPS50835\t2.5\t114",
    b"P61769\tIPR007110\tImmunoglobulin-like domain\tPS50835\t0x16\t114",
    b"P61769\tIPR007110\tImmunoglobulin-like domain\tPS50835\t114\t22",
    b"P61769\tIPR007110\tImmunoglobulin-like domain\tPS50835\t0\t22",
    b"P61769\tIPR007110\tImmunoglobulin-like domain\tPS50835\t-5\t22",
    b"P61769\tIPR007110\tImmunoglobulin-like domain\tPS50835\t22\t3000000000",
    b"P61769\tIPR007110\tImmunoglobulin-like domain\tPS50835\t 22\t+114",
    b"P61769\tIPR007110\tImmunoglobulin-like domain\tPS50835\t2_2\t0000000114",
    "P61769\tIPR007110\tImmunoglobulin-like domain\tPS50835\t٢٢\t114".encode(),
    b' P61769\tIPR007110\tA "quoted" name\tPS50835\t22\t114',
    b'M4KW32\tIPR003439\t"ABC transporter\tPF00005\t21\t170',
    b"M4KW32\tIPR003439\tnot UTF-8 \xff\xfe here\tPF00005\t21\t170",
    b"M4KW32\tIPR003439\tcut short \xe2\x82\tPF00005\t21\t170",
    b"M4KW32\tIPR003439\tABC transporter-like, ATP-binding domain\tPF00005\t21\t170 ",
]


def _mixed_lines(n: int, seed: int = 0) -> bytes:
    """n lines: real protein2ipr rows with the ODD lines strewn among them, LF, CRLF and CR
    endings, and no newline after the last line."""
    rng = np.random.default_rng(seed)
    good = [ln.encode() for ln in P2IPR]
    lines = [ODD[i % len(ODD)] if rng.random() < 0.3 else good[rng.integers(len(good))]
             for i in range(n)]  # fmt: skip
    ends = rng.choice([b"\n", b"\r\n", b"\r"], size=n, p=[0.8, 0.15, 0.05])
    return b"".join(ln + end for ln, end in zip(lines, ends, strict=True))[: -len(ends[-1])]


def _same_as_per_line(src, tmp_path, monkeypatch, block_size=1 << 10, **kw):
    """The streaming ingest of `src` (with no per-line fallback) and the per-line reference
    give the same rows, counts, rejects and stored metadata."""
    import esm3.data.interpro as interpro

    ref = ingest_protein2ipr_lines(src, tmp_path / "ref.parquet", **kw)
    monkeypatch.setattr(interpro, "ingest_protein2ipr_lines", None)  # no fallback
    got = ingest_protein2ipr(src, tmp_path / "new.parquet", block_size=block_size, **kw)
    assert got == ref
    new, old = pq.read_table(tmp_path / "new.parquet"), pq.read_table(tmp_path / "ref.parquet")
    assert new.schema.equals(IPR_SCHEMA) and new.to_pylist() == old.to_pylist()
    assert new.schema.metadata == old.schema.metadata
    assert _row_groups(tmp_path / "new.parquet") == _row_groups(tmp_path / "ref.parquet")
    return ref


def _row_groups(path) -> list[int]:
    meta = pq.read_metadata(path)
    return [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]


@pytest.mark.parametrize("compress", [True, False], ids=["gzip", "plain"])
def test_streaming_ingest_equals_per_line_reader(tmp_path, monkeypatch, compress):
    data = _mixed_lines(4000)
    src = tmp_path / ("p2i.dat.gz" if compress else "p2i.dat")
    src.write_bytes(gzip.compress(data) if compress else data)
    summary, rejects = _same_as_per_line(src, tmp_path, monkeypatch, block_size=1 << 12)
    assert len(data) > 40 * (1 << 12)  # read in many batches
    # the reference saw every kind of line
    lines = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
    skipped = sum(not ln.strip() or ln.startswith(b"#") for ln in lines)
    assert summary["lines"] == len(lines) - skipped and summary["malformed"] == len(rejects)
    details = {r["detail"].split(" ")[0] for r in rejects}
    assert {"1", "5", "7", "empty", "bad", "start/end", "end"} <= details
    bad = [i + 1 for i, ln in enumerate(lines) if ln.startswith(b"P61769\tIPRX")]
    assert [f"line {n}" for n in bad] == [r["record"] for r in rejects if "'IPRX'" in r["detail"]]
    rows = pq.read_table(tmp_path / "new.parquet").to_pylist()
    names = {r["name"] for r in rows}
    assert {'A "quoted" name', '"ABC transporter', "not UTF-8 \ufffd\ufffd here"} <= names
    # rows the vectorised checks leave to the per-line parser, which accepts them
    assert "Arabic-Indic digits, \\d takes them" in names
    assert {(r["start"], r["end"]) for r in rows if r["signature"] == "PS50835"} == {(22, 114)}


def test_streaming_ingest_filters_and_caps_rejects_like_per_line(tmp_path, monkeypatch):
    src = tmp_path / "p2i.dat.gz"
    src.write_bytes(gzip.compress(_mixed_lines(3000, seed=1)))
    summary, rejects = _same_as_per_line(src, tmp_path, monkeypatch, accessions={"P61769", "M4KW32"},
                                         max_rejects=7, batch_rows=100)  # fmt: skip
    assert len(rejects) == 7 and summary["malformed"] > 7 and summary["filtered"] > 0


@pytest.mark.parametrize(
    "data", [b"", b"\n\n", b"# only a comment\n", gzip.compress(b"\n"), b"P01892\tIPR001039"],
    ids=["empty", "blank", "comment", "gzip-blank", "one-short-line"],
)  # fmt: skip
def test_streaming_ingest_of_files_without_rows(tmp_path, monkeypatch, data):
    src = tmp_path / "p2i.dat"
    src.write_bytes(data)
    _same_as_per_line(src, tmp_path, monkeypatch)


def test_streaming_ingest_reads_concatenated_gzip_members(tmp_path, monkeypatch):
    src = tmp_path / "p2i.dat.gz"
    data = _mixed_lines(500, seed=2)
    half = data.index(b"\n", len(data) // 2) + 1
    src.write_bytes(gzip.compress(data[:half]) + gzip.compress(data[half:]))
    summary, _ = _same_as_per_line(src, tmp_path, monkeypatch)
    assert summary["rows"] > 0


# pyarrow cannot decode a short line that is not UTF-8 for its handler; it reports that as
# an unraisable exception, then a parse error, and the file goes per-line
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize(
    "first",
    [b"\xef\xbb\xbfP00974", b"P61769\tnot UTF-8 \xff", b"P61769\t" + b"long " * 1000],
    ids=["byte-order-mark", "short-line-not-utf8", "line-longer-than-a-block"],
)
def test_files_the_stream_cannot_read_go_per_line(tmp_path, monkeypatch, first):
    import esm3.data.interpro as interpro

    src = tmp_path / "p2i.dat"  # plain: pyarrow may read gzip input in larger blocks
    rest = b"\n".join(ln.encode() for ln in P2IPR)
    src.write_bytes(first + b"\tIPR002223\tx\tPF00014\t39\t89\n" + rest)
    calls = []
    per_line = interpro.ingest_protein2ipr_lines
    monkeypatch.setattr(
        interpro, "ingest_protein2ipr_lines", lambda *a: calls.append(a) or per_line(*a)
    )
    got = ingest_protein2ipr(src, tmp_path / "new.parquet", block_size=1 << 10)
    assert len(calls) == 1
    assert got == per_line(src, tmp_path / "ref.parquet")
    assert pq.read_table(tmp_path / "new.parquet").equals(pq.read_table(tmp_path / "ref.parquet"))


def _sorted_lines(n: int, seed: int = 3) -> list[bytes]:
    """n lines sorted by accession, with the ODD lines that give no row among them."""
    rng = np.random.default_rng(seed)
    rows = sorted(P2IPR[i % len(P2IPR)].replace("\t", f"{i:05d}\t", 1) for i in range(n))
    no_row = [
        ln
        for ln in ODD
        if not isinstance(parse_protein2ipr_line(ln.decode(errors="replace")), tuple)
    ]
    return [no_row[rng.integers(len(no_row))] if rng.random() < 0.2 else r.encode() for r in rows]


def _counted_sorts(monkeypatch) -> list:
    import esm3.data.interpro as interpro

    calls, sort = [], interpro._sort_by_accession
    monkeypatch.setattr(interpro, "_sort_by_accession", lambda *a: calls.append(a) or sort(*a))
    return calls


def test_sorted_input_skips_the_sort(tmp_path, monkeypatch):
    src = tmp_path / "p2i.dat.gz"
    src.write_bytes(gzip.compress(b"\n".join(_sorted_lines(3000)) + b"\n"))
    sorts = _counted_sorts(monkeypatch)
    # batches of ~200 rows into row groups of 90
    kw = {"batch_rows": 90, "block_size": 1 << 14}
    summary, _ = _same_as_per_line(src, tmp_path, monkeypatch, **kw)
    assert len(sorts) == 1  # the per-line reference's only
    assert summary["rows"] > 2000 and len(_row_groups(tmp_path / "new.parquet")) > 20


@pytest.mark.parametrize("late", [False, True], ids=["sorted", "late-row"])
@pytest.mark.parametrize("apart", [False, True], ids=["together", "one-row-a-batch"])
def test_only_unsorted_input_is_sorted(tmp_path, monkeypatch, apart, late):
    src = tmp_path / "p2i.dat"
    lines = _sorted_lines(40 if apart else 3000)
    if late:  # an accession before all others, last
        lines.append(b"A0A000\tIPR003439\tABC transporter-like\tPF00005\t21\t170")
    if apart:  # 1.5 KB of comments before each line: no 1 KB batch holds two rows
        lines = [b"\n".join([b"#" * 99] * 15 + [ln]) for ln in lines]
    src.write_bytes(b"\n".join(lines))
    sorts = _counted_sorts(monkeypatch)
    _same_as_per_line(src, tmp_path, monkeypatch, batch_rows=500)
    assert len(sorts) == (2 if late else 1)  # the per-line reference always sorts


def test_a_shards_annotation_join_reads_only_the_row_groups_of_its_accessions(tmp_path):
    """protein2ipr is ~1.4 x 10^9 lines: a structure shard's join must not read all of it."""
    lines = [f"A{i:07d}\tIPR{i % 999_999:06d}\tname\tPF{i:05d}\t1\t{10 + i % 50}\n"
             for i in range(0, 60_000, 3)][::-1]  # fmt: skip # unsorted: the ingest sorts it
    src = tmp_path / "protein2ipr.dat"
    src.write_text("".join(lines))
    out = tmp_path / "ipr.parquet"
    ingest_protein2ipr(src, out, batch_rows=1_000)
    groups = pq.ParquetFile(out).num_row_groups
    assert groups == 20
    wanted = ["A0030000", "A0030003", "A0030300"]  # a shard's accessions, one narrow range
    con = connect()
    try:
        plan = annotations_relation(con, [str(out)], wanted).explain(type="analyze")
        got = annotations_relation(con, [str(out)], wanted).fetchall()
    finally:
        con.close()
    assert [r[0] for r in got] == wanted
    scanned = re.search(r"Row Groups Scanned: (\d+) / (\d+)", plan)
    assert scanned and int(scanned.group(2)) == groups
    assert int(scanned.group(1)) <= 2  # the groups holding that range, not all 20
