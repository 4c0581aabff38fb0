"""`esm3 preprocess sequences` on OAS data units and JGI genome tarballs, `esm3 preprocess
structures` on an AFDB tar bundle, on the local executor: the published formats as they
are, bad units and members as rejects while the rest completes, training stores at the end."""

from __future__ import annotations

import gzip
import json

import pyarrow.parquet as pq
import pytest

from esm3.data.store import open_store
from esm3.metrics.catalog import query
from jobs.clusters import load_profile
from jobs.preprocess import run_preprocess
from tests.bundles import (
    OAS_COLUMNS,
    afdb_bundle,
    jgi_tarball,
    oas_metadata,
    paired_unit,
    predicted_pdb,
    unpaired_unit,
    write_oas_unit,
)
from tests.realdata import described_sequences, mda_file


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("formats")
    seqs = [s for _, s in described_sequences(120, skip=1000)]
    oas = d / "oas"
    oas.mkdir()
    unpaired_unit(oas / "SRR9179275_1_Heavy_IGHG.csv.gz",
                  oas_metadata("SRR9179275", "Heavy", "IGHG"), seqs[:40])  # fmt: skip
    paired_unit(oas / "1279049_1_Paired_All.csv.gz", oas_metadata("1279049", "Paired", "All"),
                list(zip(seqs[40:60], seqs[60:80], strict=True)))  # fmt: skip
    write_oas_unit(oas / "SRR0000001_1_Heavy_IGHM.csv.gz",
                   oas_metadata("SRR0000001", "Heavy", "IGHM"),
                   [c for c in OAS_COLUMNS if c != "sequence_alignment_aa"], [{"sequence": "A"}])  # fmt: skip
    jgi = d / "jgi"
    jgi.mkdir()
    recs = described_sequences(60, skip=1200)
    jgi_tarball(jgi / "2506783001.tar.gz", {2506783001: ("Escherichia coli K-12", recs[:30])})
    jgi_tarball(jgi / "2510065017.tar.gz", {2510065017: ("Bacillus subtilis 168", recs[30:])})
    afdb = d / "afdb"
    afdb.mkdir()
    members = [(f"AF-P{10000 + i}-F1-model_v4.pdb.gz", gzip.compress(predicted_pdb(mda_file(n))))
               for i, n in enumerate(("5PTI.cif.gz", "1BD2.cif.gz", "3PWP.cif.gz"))]  # fmt: skip
    afdb_bundle(afdb / "UP000005640_9606_HUMAN_v4.tar", members + [("README.txt", b"AFDB")])
    esm = d / "esmatlas"  # plain files in folders, with the Atlas's metadata table
    for k, name in enumerate(("5PTI.cif.gz", "1BD2.cif.gz", "3PWP.cif.gz", "1YJP.cif.gz")):
        (esm / f"{k // 2:03d}").mkdir(parents=True, exist_ok=True)
        pdb = predicted_pdb(mda_file(name))
        (esm / f"{k // 2:03d}" / f"MGYP{k:012d}.pdb.gz").write_bytes(gzip.compress(pdb))
    # pLDDT on 0-100 as the Atlas stores it; entry 2 fails, entry 3 has no row
    (d / "esm-metadata.csv").write_text(
        "id,plddt,ptm\nMGYP000000000000,85,0.8\nMGYP000000000001,90,0.9\n"
        "MGYP000000000002,40,0.5\nMGYP999999999999,99,0.99\n"
    )
    cfg = d / "formats.toml"
    cfg.write_text(f"""
name = "formats"
[purge]
enabled = false
[structures]
sasa = []
ss8 = []
[[datasets]]
name = "oas"
type = "sequence"
format = "oas"
paths = ["{oas}/*.csv.gz"]
levels = [0.95]
purge = false
[[datasets]]
name = "jgi"
type = "sequence"
header = "jgi"
paths = ["{jgi}/*.tar.gz"]
levels = [0.7]
[[datasets]]
name = "afdb"
type = "structure"
format = "afdb"
paths = ["{afdb}/*.tar"]
split = 2
[[datasets]]
name = "esmatlas"
type = "structure"
format = "esmatlas"
paths = ["{esm}/*/*.pdb.gz"]
metadata = "{d}/esm-metadata.csv"
shard_size = 2
""")
    from jobs.workspace import prepare

    ws = prepare(d / "ws")
    local = load_profile("local")
    seq = run_preprocess(ws, local, cfg, "sequences", progress=False, timeout_s=600)
    struct = run_preprocess(ws, local, cfg, "structures", progress=False, timeout_s=600)
    return ws, seq, struct


def test_structures_are_listed_once_and_prefiltered_before_any_is_opened(run):
    ws, _, struct = run
    (listed,) = [r for r in struct.results["list"] if r["dataset"] == "esmatlas"]
    assert listed["listed_files"] == 4 and listed["archives"] == 0
    assert listed["prefilter"] == {"listed": 4, "kept": 3, "dropped": 1, "without_metadata": 1}
    inventory = ws / "data/preprocess/formats/inventory/esmatlas"
    meta = pq.read_table(inventory / "metadata.parquet")  # the CSV as Parquet sorted by id
    assert meta["id"].to_pylist() == sorted(meta["id"].to_pylist()) and meta.num_rows == 4
    assert meta.column_names == ["id", "plddt", "ptm"] and max(meta["plddt"].to_pylist()) == 99
    assert pq.read_table(inventory / "selected.parquet")["id"].to_pylist() == [
        "MGYP000000000000", "MGYP000000000001", "MGYP000000000003"]  # fmt: skip
    # the dropped entry was never opened: 3 files in 2 shards, no reject of it
    manifest = json.loads((ws / "data/preprocess/formats/manifest.json").read_text())
    shards = manifest["datasets"]["esmatlas"]["shards"]
    assert len(shards) == 2
    assert sum(json.loads(pq.read_metadata(s).metadata[b"esm3.summary"])["files"]
               for s in shards) == 3  # fmt: skip
    rej = query(ws, "SELECT record, reason FROM rejects WHERE run_id = ? AND source LIKE "
                "'%esmatlas%'", [struct.run_id])  # fmt: skip
    assert rej.reason.tolist() == ["no_metadata"] and rej.record[0].startswith("MGYP000000000003")


def test_a_current_listing_is_reused_and_list_walks_again(run):
    ws, _, struct = run
    cfg = ws.parent / "formats.toml"
    local = load_profile("local")
    plan = run_preprocess(ws, local, cfg, "all", dry_run=True).summary
    assert "list:" not in plan  # every listing is current: nothing to walk
    assert "jgi: listed " in plan and "0 file(s), 2 archive(s)" in plan
    assert "structures: 4 item(s)" in plan  # afdb: 1 bundle x 2 parts; esmatlas: 2 shards
    extra = ws.parent / "esmatlas" / "002" / "MGYP000000000004.pdb.gz"
    extra.parent.mkdir()
    extra.write_bytes(gzip.compress(predicted_pdb(mda_file("5PTI.cif.gz"))))
    again = run_preprocess(ws, local, cfg, "list", progress=False, timeout_s=300)
    counts = {r["dataset"]: r["prefilter"] if "prefilter" in r else r["listed_files"]
              for r in again.results["list"]}  # fmt: skip
    assert counts == {"afdb": 0, "esmatlas": {"listed": 5, "kept": 4, "dropped": 1,
                                              "without_metadata": 2},
                      "jgi": 0, "oas": 3}  # fmt: skip
    archives = {r["dataset"]: r["archives"] for r in again.results["list"]}
    assert archives == {"afdb": 1, "esmatlas": 0, "jgi": 2, "oas": 0}
    assert set(again.results) == {"list"}  # nothing but the walk
    extra.unlink()
    run_preprocess(ws, local, cfg, "list", progress=False, timeout_s=300)  # as it was


def test_sequences_from_oas_units_and_jgi_tarballs(run):
    ws, seq, _ = run
    root = ws / "data" / "preprocess" / "formats"
    manifest = json.loads((root / "manifest.json").read_text())
    ingest = {r["source"].rsplit("/", 1)[-1]: r for r in seq.results["ingest"]}
    assert ingest["SRR9179275_1_Heavy_IGHG.csv.gz"]["written"] == 40
    assert ingest["1279049_1_Paired_All.csv.gz"]["written"] == 40  # heavy + light of 20 rows
    assert ingest["SRR0000001_1_Heavy_IGHM.csv.gz"]["written"] == 0  # rejected, run goes on
    assert ingest["2506783001.tar.gz"]["written"] == 30 == ingest["2510065017.tar.gz"]["written"]
    oas = manifest["datasets"]["oas"]
    t = pq.read_table(oas["shards"][0])  # the units in name order: the paired one first
    assert {"unit", "row", "chain", "species", "isotype", "study", "run"} <= set(t.column_names)
    assert t["id"][0].as_py() == "1279049_1_Paired_All:0:heavy"
    for name, n in (("oas", 80), ("jgi", 60)):
        store = open_store(manifest["datasets"][name]["store"])
        assert len(store) == n, name
    rej = query(ws, "SELECT record, reason, source FROM rejects WHERE run_id = ?", [seq.run_id])
    assert rej[["record", "reason"]].to_dict("records") == [
        {"record": "SRR0000001_1_Heavy_IGHM", "reason": "missing_column"}
    ]
    assert rej.source[0].endswith("/oas/SRR0000001_1_Heavy_IGHM.csv.gz")


def test_structures_from_an_afdb_bundle_in_two_parts(run):
    ws, _, struct = run
    manifest = json.loads((ws / "data/preprocess/formats/manifest.json").read_text())
    entry = manifest["datasets"]["afdb"]
    afdb = struct.results["structures"][:2]  # the bundle shared by two tasks (esmatlas next)
    assert [r["members"] for r in afdb] == [2, 1]
    ids = sorted(i for s in entry["shards"] for i in pq.read_table(s)["id"].to_pylist())
    assert ids and all(i.startswith("AF-P1000") for i in ids)
    assert len(open_store(entry["store"])) == len(ids)
    rej = query(ws, "SELECT record, reason, source FROM rejects WHERE run_id = ? AND reason = "
                "'not_a_structure'", [struct.run_id])  # fmt: skip
    assert rej.record.tolist() == ["README.txt"]
    assert rej.source[0].endswith("UP000005640_9606_HUMAN_v4.tar:README.txt")
