"""Function and residue labels of sequence records: site-feature ingest, label vocabularies,
the DuckDB join of sequence shards with InterPro tables, and the demo's stand-in files.

Sequences are real (mmseqs2-examples UniProt records); the label lines are written here in
the protein2ipr / InterProScan / site formats for them, as in test_interpro.py.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from esm3.data.interpro import (
    IPR_SCHEMA,
    SITE_SCHEMA,
    frequent_labels,
    ingest_interproscan,
    ingest_protein2ipr,
    ingest_sites,
)
from esm3.data.sequence_annotations import annotate_sequence_shard
from esm3.tasks.sample import Protein
from tests.realdata import uniprot_fasta

DEMO_LABELS = Path(__file__).resolve().parents[2] / "jobs/configs/preprocess/demo-labels"


def _uniprot(accessions: set[str]) -> dict[str, str]:
    seqs: dict[str, str] = {}
    acc = None
    with gzip.open(uniprot_fasta(), "rt") as f:
        for line in f:
            if line.startswith(">"):
                acc = line.split("|")[1]
            elif acc in accessions:
                seqs[acc] = seqs.get(acc, "") + line.strip()
    return seqs


@pytest.fixture(scope="module")
def real():
    return _uniprot({"M4KW32", "W0FSK4", "Q8AWH3"})


def test_site_ingest_refuses_malformed_lines(tmp_path):
    src = tmp_path / "sites.tsv"
    src.write_text(
        "# a comment line\n"
        "M4KW32\tcd00267:ATP binding site\tATP binding site\t47\t54\n"
        "M4KW32\tcd00267:Walker B\tWalker B motif\t150\t155\n"
        "M4KW32\tcd00267:ATP binding site\t4 columns\t47\n"
        "W0FSK4\tPS00017\tP-loop\t30\t20\n"
    )
    summary, rejects = ingest_sites(src, tmp_path / "s.parquet")
    assert summary["rows"] == 2 and summary["malformed"] == 2
    assert [r["record"] for r in rejects] == ["line 4", "line 5"]
    assert (
        "4 columns, expected 5" in rejects[0]["detail"] and "start <= end" in rejects[1]["detail"]
    )
    t = pq.read_table(tmp_path / "s.parquet")
    assert t.schema.equals(SITE_SCHEMA)
    assert t.slice(0, 1).to_pylist()[0] == {"accession": "M4KW32", "label": "cd00267:ATP binding site",
                                            "description": "ATP binding site", "start": 47, "end": 54}  # fmt: skip


def test_frequent_labels_count_distinct_proteins(tmp_path):
    src = tmp_path / "p.tsv"
    src.write_text(
        "A1\tIPR000001\tx\tPF1\t1\t5\nA1\tIPR000001\tx\tSM1\t1\t5\n"  # one protein, twice
        "A2\tIPR000001\tx\tPF1\t1\t5\nA2\tIPR000002\ty\tPF2\t1\t5\nA3\tIPR000003\tz\tPF3\t1\t5\n"
    )
    ingest_protein2ipr(src, tmp_path / "p.parquet")
    paths = [tmp_path / "p.parquet"]
    assert frequent_labels(paths, "ipr", IPR_SCHEMA, 1) == ["IPR000001", "IPR000002", "IPR000003"]
    assert frequent_labels(paths, "ipr", IPR_SCHEMA, 2) == ["IPR000001"]
    assert frequent_labels(paths, "ipr", IPR_SCHEMA, 3) == []
    assert frequent_labels([], "label", SITE_SCHEMA, 1) == []


def test_join_matches_uniref_representative_and_mgnify_ids(real, tmp_path):
    n_m4, n_w0 = len(real["M4KW32"]), len(real["W0FSK4"])
    p2i = tmp_path / "protein2ipr.dat"
    p2i.write_text(
        f"M4KW32\tIPR003439\tABC transporter-like, ATP-binding domain\tPF00005\t21\t170\n"
        f"M4KW32\tIPR003439\tABC transporter-like, ATP-binding domain\tPS50893\t21\t170\n"
        f"M4KW32\tIPR027417\tP-loop NTPase\tG3DSA\t1\t{n_m4 + 40}\n"  # ends past the sequence
        f"W0FSK4\tIPR000001\tpast the end\tPF1\t{n_w0 + 1}\t{n_w0 + 9}\n"  # starts past it
    )
    ips = tmp_path / "mgnify.tsv"  # InterProScan TSV for an MGnify protein
    ips.write_text("MGYP000000000001\tab12\t90\tPfam\tPF00005\tABC\t3\t60\t1E-9\tT\t01-01-2024"
                   "\tIPR003439\tABC transporter-like, ATP-binding domain\t-\t-\n")  # fmt: skip
    sites = tmp_path / "sites.tsv"
    sites.write_text("M4KW32\tcd00267:ATP binding site\tATP binding site\t47\t54\n"
                     "M4KW32\tcd00267:ATP binding site\tATP binding site\t80\t80\n")  # fmt: skip
    ingest_protein2ipr(p2i, tmp_path / "ipr.parquet")
    ingest_interproscan(ips, tmp_path / "ips.parquet")
    ingest_sites(sites, tmp_path / "sites.parquet")
    shard = tmp_path / "shard.parquet"
    ids = ["UniRef90_M4KW32", "W0FSK4", "MGYP000000000001", "Q8AWH3"]
    seqs = [real["M4KW32"], real["W0FSK4"], real["M4KW32"][:90], real["Q8AWH3"]]
    pq.write_table(pa.table({"id": ids, "sequence": seqs, "length": [len(s) for s in seqs]}), shard)
    out = tmp_path / "annotated.parquet"
    summary = annotate_sequence_shard(
        shard, out, [tmp_path / "ipr.parquet", tmp_path / "ips.parquet"],
        [tmp_path / "sites.parquet"], threads=1, memory_limit="256MB", temp_dir=tmp_path / "tmp",
    )  # fmt: skip
    assert summary == {"rows": 4, "annotated": 2, "with_sites": 1, "skipped": False}
    rows = pq.read_table(out).to_pylist()
    assert [r["id"] for r in rows] == ids  # the input's order, every column kept
    assert [r["length"] for r in rows] == [len(s) for s in seqs]
    # the UniRef cluster by its representative: duplicates of one IPR from two signatures
    # collapse, a span past the sequence is clipped
    assert rows[0]["annotations"] == [
        {"ipr": "IPR003439", "start": 21, "end": 170},
        {"ipr": "IPR027417", "start": 1, "end": n_m4},
    ]
    assert rows[0]["residue_annotations"] == [
        {"label": "cd00267:ATP binding site", "start": 47, "end": 54},
        {"label": "cd00267:ATP binding site", "start": 80, "end": 80},
    ]
    assert rows[1]["annotations"] is None  # its only span starts past the sequence
    assert rows[2]["annotations"] == [{"ipr": "IPR003439", "start": 3, "end": 60}]
    assert rows[3]["annotations"] is None and rows[3]["residue_annotations"] is None
    p = Protein.from_record(rows[0])
    assert p.function[0] == ("IPR003439", 21, 170) and p.residue_annotations[1][1:] == (80, 80)
    again = annotate_sequence_shard(shard, out, [tmp_path / "ipr.parquet"])
    assert again["skipped"] is True and again["annotated"] == 2


def test_no_label_tables_gives_null_columns(real, tmp_path):
    shard = tmp_path / "s.parquet"
    pq.write_table(pa.table({"id": ["W0FSK4"], "sequence": [real["W0FSK4"]]}), shard)
    annotate_sequence_shard(shard, tmp_path / "o.parquet", [])
    t = pq.read_table(tmp_path / "o.parquet")
    assert t.column("annotations").null_count == 1
    assert t.schema.field("residue_annotations").type.value_type.names == ["label", "start", "end"]


def test_demo_stand_in_files_are_small_labelled_and_readable(tmp_path):
    p2i, sites = DEMO_LABELS / "protein2ipr-standin.tsv.gz", DEMO_LABELS / "sites-standin.tsv.gz"
    for f in (p2i, sites):
        assert f.stat().st_size < 1_000_000
        with gzip.open(f, "rt") as fh:
            head = fh.readline()
        assert head.startswith("# STAND-IN") and "NOT InterPro data" in head
    fam = ingest_protein2ipr(p2i, tmp_path / "p.parquet")
    site = ingest_sites(sites, tmp_path / "s.parquet")
    assert fam.summary["malformed"] == 0 and site.summary["malformed"] == 0
    assert fam.summary["rows"] == 20_000  # one family label per mmseqs2-examples sequence
    labels = frequent_labels([tmp_path / "p.parquet"], "ipr", IPR_SCHEMA, 5)
    assert 100 < len(labels) < 1000 and all(x >= "IPR900000" for x in labels)
    assert frequent_labels([tmp_path / "s.parquet"], "label", SITE_SCHEMA, 10) == [
        "PS00004", "PS00016", "PS00017"]  # fmt: skip
