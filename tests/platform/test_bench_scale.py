"""A tiny smoke of the scale benchmark (`esm3 bench scale`): its synthetic inputs are read
by the stages as real ones (no rejects, every record written, UniRef90 header fields
parsed) and its rows carry the large/small ratio. No timings here."""

from __future__ import annotations

import pyarrow.parquet as pq

from jobs.bench import bench_scale as scale
from jobs.bench import scale_inputs


def test_uniref_fasta_is_ingested_whole_with_its_header_fields(tmp_path):
    fasta = scale_inputs.write_uniref_fasta(tmp_path / "u.fasta.gz", 300)
    m = scale._ingest(fasta, tmp_path / "s.parquet", tmp_path)
    assert m["summary"]["written"] == 300 and m["summary"]["rejected"] == 0
    rows = pq.read_table(tmp_path / "s.parquet").to_pylist()
    assert rows[0]["id"] == "UniRef90_A0A0000000"
    assert int(rows[0]["taxid"]) in {taxid for _, taxid, _ in scale_inputs.TAXA}
    assert rows[0]["name"].startswith("A0A0000000_") and " n=" not in rows[0]["description"]
    assert m["peak_mb"] >= m["imports_mb"] > 0


def test_oas_unit_and_protein2ipr_are_read_without_rejects(tmp_path):
    oas = scale.oas_ingest(tmp_path, 200)[""]["summary"]
    assert oas["written"] == oas["rows"] == 200 and oas["rejected"] == 0
    ipr = scale.interpro_ingest(tmp_path, 500)[""]["summary"]
    assert ipr["rows"] == ipr["lines"] == 500 and ipr["malformed"] == 0


def test_rows_give_the_ratio_of_the_large_size_to_the_small(tmp_path, monkeypatch):
    monkeypatch.setenv("ESM3_BENCH_SCRATCH", str(tmp_path))
    monkeypatch.setenv("ESM3_BENCH_SCALE_ESMATLAS_LOOKUP", "300,600")
    rows = scale.run(quick=True, cases=["esmatlas_lookup"])
    flat = {r["name"]: r for r in rows if r["name"].endswith("_flatness")}
    assert set(flat) == {"esmatlas_lookup_parquet_flatness", "esmatlas_lookup_csv_flatness"}
    assert all(r["ratio"] == r["value"] / r["baseline"] for r in flat.values())
    assert {r["metric"] for r in rows} >= {"peak_rss", "s_per_shard", "peak_rss_600"}
    assert list(tmp_path.iterdir()) == []  # the case's data is removed
