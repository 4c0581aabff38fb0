"""Tar archives read in place: JGI-style genome tarballs through FASTA ingest, AFDB-style
bundles of real structures through the structures stage; each equals the same data read
from plain files. Truncated archives and members of the wrong kind become rejects naming
archive and member, and the rest completes."""

from __future__ import annotations

import gzip
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from esm3.data.archives import (
    FASTA_MEMBERS,
    STRUCTURE_MEMBERS,
    ArchiveError,
    ArchivePart,
    WalkStats,
    is_archive,
    iter_members,
)
from esm3.data.fasta import ingest_fasta
from esm3.data.structures import stages as stages_mod
from esm3.data.structures.records import read_shard
from esm3.data.structures.stages import StructureStageConfig, process_structure_shard
from jobs.config import ConfigError
from jobs.stages.config import DatasetConfig, Inputs, PreprocessConfig, check_inputs
from jobs.stages.inventory import list_task, listing_key, load_listing
from jobs.stages.runner import Layout
from jobs.stages.structures import structure_shards, task_inputs
from tests.bundles import add_member, afdb_bundle, img_genes_faa, jgi_tarball, predicted_pdb
from tests.realdata import described_sequences, mda_file

GENOMES = {
    2506783001: ("Escherichia coli K-12 MG1655", 0),
    2510065017: ("Bacillus subtilis 168", 150),
}


def _genomes() -> dict[int, tuple[str, list[tuple[str, str]]]]:
    return {oid: (org, described_sequences(150, skip)) for oid, (org, skip) in GENOMES.items()}


def _without_offset(table: pa.Table) -> pa.Table:
    return table.drop_columns(["offset"])


def _reasons(rejects: list[dict]) -> list[tuple[str, str]]:
    return [(r["record"], r["reason"]) for r in rejects]


# --- FASTA archives (JGI/IMG) ---------------------------------------------------------------


def test_jgi_tarball_with_two_genomes_equals_the_plain_files(tmp_path):
    genomes = _genomes()
    genomes[2506783001][1][4] = ("planted bad letter", "MKTAYJAK")
    tarball = jgi_tarball(tmp_path / "img.tar.gz", genomes)
    plain = tmp_path / "genes.faa"
    plain.write_bytes(
        b"".join(img_genes_faa(oid, org, recs) for oid, (org, recs) in genomes.items())
    )

    summary, rejects = ingest_fasta(tarball, tmp_path / "a.parquet", dataset="jgi",
                                    header_format="jgi")  # fmt: skip
    ref_summary, ref_rejects = ingest_fasta(plain, tmp_path / "p.parquet", dataset="jgi",
                                            header_format="jgi")  # fmt: skip
    got, ref = pq.read_table(tmp_path / "a.parquet"), pq.read_table(tmp_path / "p.parquet")
    assert _without_offset(got).equals(_without_offset(ref)) and got.num_rows == 299
    assert got["taxon"].unique().to_pylist() == [org for org, _ in GENOMES.values()]
    offsets = got["offset"].to_pylist()
    assert offsets == sorted(set(offsets))  # unique, in archive order
    assert _reasons(rejects) == _reasons(ref_rejects) == [("2506783006", "invalid_characters")]
    assert rejects[0]["source"] == f"{tarball}:2506783001/2506783001.genes.faa"
    # the nucleotide, GFF and COG files beside the proteins are skipped, not read
    assert (summary["members"], summary["members_skipped"], summary["members_rejected"]) == (
        2,
        6,
        0,
    )
    assert summary["stop_removed"] == ref_summary["stop_removed"] == 300


def test_gzip_members_of_a_plain_tar_and_member_globs(tmp_path):
    recs = described_sequences(30, skip=400)
    faa = img_genes_faa(2600000001, "Lake metagenome", recs)
    with tarfile.open(tmp_path / "b.tar", "w") as tar:
        add_member(tar, "x/2600000001.genes.faa.gz", gzip.compress(faa))
        add_member(tar, "x/2600000001.a.fa", faa)  # not a default member name
    plain = tmp_path / "p.faa"
    plain.write_bytes(faa)
    ingest_fasta(tmp_path / "b.tar", tmp_path / "b.parquet", dataset="jgi", header_format="jgi")
    ingest_fasta(plain, tmp_path / "p.parquet", dataset="jgi", header_format="jgi")
    got = pq.read_table(tmp_path / "b.parquet")
    assert _without_offset(got).equals(_without_offset(pq.read_table(tmp_path / "p.parquet")))
    s, _ = ingest_fasta(tmp_path / "b.tar", tmp_path / "c.parquet", dataset="jgi",
                        header_format="jgi", members=["*.a.fa"])  # fmt: skip
    assert s["members"] == 1 and s["members_skipped"] == 1 and s["written"] == 30


def test_truncated_tarball_keeps_the_complete_genomes(tmp_path):
    genomes = _genomes()
    raw = jgi_tarball(tmp_path / "img.tar.gz", genomes).read_bytes()
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(raw[: int(len(raw) * 0.75)])  # inside the second genome's proteins
    summary, rejects = ingest_fasta(cut, tmp_path / "t.parquet", dataset="jgi",
                                    header_format="jgi")  # fmt: skip
    got = pq.read_table(tmp_path / "t.parquet")
    # the first genome whole, nothing of the broken member
    assert got["taxon"].unique().to_pylist() == ["Escherichia coli K-12 MG1655"]
    assert got.num_rows == 150 == summary["written"]
    (r,) = rejects
    assert r["reason"] == "truncated_archive"
    assert r["source"] == f"{cut}:2510065017/2510065017.genes.faa"
    assert str(cut) in r["detail"] and "2510065017.genes.faa" in r["detail"]


def test_member_that_is_not_fasta_is_a_reject_and_the_rest_completes(tmp_path):
    faa = img_genes_faa(2700000001, "Soil", described_sequences(10, skip=700))
    with tarfile.open(tmp_path / "m.tar.gz", "w:gz") as tar:
        add_member(tar, "g/broken.faa", b"\x00\x01binary, not FASTA")
        add_member(tar, "g/empty.fasta", b"")
        add_member(tar, "g/2700000001.genes.faa", faa)
    summary, rejects = ingest_fasta(tmp_path / "m.tar.gz", tmp_path / "m.parquet",
                                    dataset="jgi", header_format="jgi")  # fmt: skip
    assert _reasons(rejects) == [("g/broken.faa", "not_fasta"), ("g/empty.fasta", "not_fasta")]
    assert summary["written"] == 10 and summary["members_rejected"] == 2
    with tarfile.open(tmp_path / "none.tar", "w") as tar:
        add_member(tar, "g/g.genes.fna", b">1\nACGT\n")
    _, rejects = ingest_fasta(tmp_path / "none.tar", tmp_path / "n.parquet", dataset="jgi")
    assert _reasons(rejects) == [("none.tar", "no_fasta_members")]


def test_walk_keeps_no_member_list_and_parts_split_the_members(tmp_path):
    with tarfile.open(tmp_path / "many.tar", "w") as tar:
        for i in range(50):
            add_member(tar, f"d/m{i:03d}.faa", f">m{i}\nMKV\n".encode())
        add_member(tar, "d/README", b"x")
    seen = []
    for m in iter_members(tmp_path / "many.tar", FASTA_MEMBERS):
        assert m._tar.members == []  # memory follows the member, not the archive
        seen.append(m.name)
    assert len(seen) == 50
    parts = [[m.name for m in iter_members(tmp_path / "many.tar", FASTA_MEMBERS, part=k, parts=3)]
             for k in range(3)]  # fmt: skip
    assert sorted(sum(parts, [])) == seen and all(len(p) in (16, 17) for p in parts)
    assert is_archive("x.tar.gz") and is_archive("X.TGZ") and not is_archive("x.fasta.gz")
    (tmp_path / "junk.tar").write_bytes(b"no tar here" * 100)
    with pytest.raises(ArchiveError, match="junk.tar"):
        list(iter_members(tmp_path / "junk.tar", FASTA_MEMBERS))


# --- structure bundles (AFDB, ESMAtlas) -------------------------------------------------------

REAL = ("5PTI.cif.gz", "1BD2.cif.gz", "3PWP.cif.gz", "4E43.pdb")
FAST = StructureStageConfig("afdb", sasa=False, ss8=False)


@pytest.fixture(scope="module")
def predicted(tmp_path_factory) -> list[tuple[str, bytes]]:
    """AFDB-named gzipped PDB models made from real MDAnalysisTests structures."""
    return [
        (f"AF-P{10000 + i}-F1-model_v4.pdb.gz", gzip.compress(predicted_pdb(mda_file(name))))
        for i, name in enumerate(REAL)
    ]


def _rows(path: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "source"} for r in read_shard(path)]


def _same_rows(a: list[dict], b: list[dict]) -> None:
    """Equal rows; per-residue arrays equal with NaN where the other has NaN."""
    assert len(a) == len(b) and a
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            if isinstance(x[k], str | int | float | None):
                assert x[k] == y[k], k
            else:
                assert np.array_equal(np.asarray(x[k]), np.asarray(y[k]), equal_nan=True), k


def test_afdb_bundle_equals_the_plain_files(tmp_path, predicted):
    plain_dir = tmp_path / "plain"
    plain_dir.mkdir()
    plain = afdb_bundle(tmp_path / "UP000005640_9606_HUMAN_v4.tar", predicted, plain_dir)
    bundle = str(tmp_path / "UP000005640_9606_HUMAN_v4.tar")
    ref = process_structure_shard(plain, tmp_path / "plain.parquet", FAST)
    got = process_structure_shard([ArchivePart(bundle)], tmp_path / "tar.parquet", FAST)
    _same_rows(_rows(tmp_path / "tar.parquet"), _rows(tmp_path / "plain.parquet"))
    assert len(_rows(tmp_path / "plain.parquet")) >= 3  # several chains pass the AFDB filters
    assert _reasons(got.rejects) == _reasons(ref.rejects)
    assert got.summary["members"] == len(predicted) and got.summary["archive_errors"] == 0
    for k in ("files", "chains", "chains_kept", "residues"):
        assert got.summary[k] == ref.summary[k], k
    sources = [r["source"] for r in read_shard(tmp_path / "tar.parquet")]
    assert all(s.startswith(f"{bundle}:AF-P1000") for s in sources)
    # two tasks sharing the bundle read it all between them, nothing twice
    halves = [process_structure_shard([ArchivePart(bundle, k, 2)], tmp_path / f"h{k}.parquet",
                                      FAST) for k in range(2)]  # fmt: skip
    ids = sorted(r["id"] for k in range(2) for r in read_shard(tmp_path / f"h{k}.parquet"))
    assert ids == sorted(r["id"] for r in read_shard(tmp_path / "plain.parquet"))
    assert sum(h.summary["members"] for h in halves) == len(predicted)


def test_esmatlas_style_tar_gz_bundle(tmp_path, predicted):
    """ESM Atlas ships .tar.gz bundles of gzipped PDB files named by MGnify id."""
    members = [(f"tm_.90_1_plddt_.90_1/MGYP{i:012d}.pdb.gz", data)
               for i, (_, data) in enumerate(predicted[:2])]  # fmt: skip
    with tarfile.open(tmp_path / "tm_.90_1_plddt_.90_1_00.tar.gz", "w:gz") as tar:
        for name, data in members:
            add_member(tar, name, data)
    meta = {f"MGYP{i:012d}": (0.9, 0.9) for i in range(2)}
    cfg = StructureStageConfig("esmatlas", sasa=False, ss8=False)
    res = process_structure_shard([ArchivePart(str(tmp_path / "tm_.90_1_plddt_.90_1_00.tar.gz"))],
                                  tmp_path / "e.parquet", cfg, esmatlas_metadata=meta)  # fmt: skip
    rows = read_shard(tmp_path / "e.parquet")
    assert {r["accession"] for r in rows} == set(meta) and res.summary["members"] == 2


def test_esmatlas_bundle_with_a_metadata_table_looks_members_up_in_batches(
    tmp_path, predicted, monkeypatch
):
    """The Atlas's metadata is a table; a bundle's ids are known only as members are read."""
    monkeypatch.setattr(stages_mod, "METADATA_BATCH", 2)  # several lookups in one part
    members = [(f"MGYP{i:012d}.pdb.gz", predicted[i % len(predicted)][1]) for i in range(5)]
    with tarfile.open(tmp_path / "bundle.tar.gz", "w:gz") as tar:
        for name, data in members:
            add_member(tar, name, data)
    # entry 1 fails pTM, entry 4 has no row; pLDDT on 0-100 as the Atlas stores it
    rows = {0: (91, 0.9), 1: (88, 0.5), 2: (80, 0.8), 3: (75, 0.71)}
    (tmp_path / "meta.csv").write_text("id,plddt,ptm\n" + "".join(
        f"MGYP{i:012d},{p},{t}\n" for i, (p, t) in rows.items()))  # fmt: skip
    cfg = StructureStageConfig("esmatlas", sasa=False, ss8=False)
    res = process_structure_shard([ArchivePart(str(tmp_path / "bundle.tar.gz"))],
                                  tmp_path / "e.parquet", cfg,
                                  esmatlas_metadata=tmp_path / "meta.csv")  # fmt: skip
    kept = {r["id"].split("_")[0] for r in read_shard(tmp_path / "e.parquet")}
    assert kept == {"MGYP000000000000", "MGYP000000000002", "MGYP000000000003"}
    reasons = {r["record"].split("_")[0]: r["reason"] for r in res.rejects}
    assert reasons == {"MGYP000000000001": "ptm", "MGYP000000000004": "no_metadata"}
    assert res.summary["members"] == 5


def test_bundle_with_bad_members_and_truncation_rejects_them_and_keeps_the_rest(
    tmp_path, predicted
):
    members = [
        predicted[0],
        ("README.txt", b"AlphaFold DB bundle"),  # not a structure file
        ("AF-Q99999-F1-model_v4.pdb.gz", gzip.compress(b"this is no structure\n")),
        predicted[1],
    ]
    afdb_bundle(tmp_path / "bad.tar", members)
    bundle = str(tmp_path / "bad.tar")
    res = process_structure_shard([ArchivePart(bundle)], tmp_path / "bad.parquet", FAST)
    by_reason = {r["reason"]: r for r in res.rejects}
    assert by_reason["not_a_structure"]["source"] == f"{bundle}:README.txt"
    bad = [r for r in res.rejects if r["source"] == f"{bundle}:AF-Q99999-F1-model_v4.pdb.gz"]
    assert bad and bad[0]["reason"] in ("unreadable", "no_protein_chain")
    assert {r["id"][:9] for r in read_shard(tmp_path / "bad.parquet")} == {
        "AF-P10000", "AF-P10001"
    }  # fmt: skip
    # truncated inside the last member: one reject naming archive and member, the others kept
    raw = (tmp_path / "bad.tar").read_bytes()
    with tarfile.open(tmp_path / "bad.tar") as t:
        last = t.getmembers()[-1]
    (tmp_path / "cut.tar").write_bytes(raw[: last.offset_data + last.size // 2])
    cut = process_structure_shard([ArchivePart(str(tmp_path / "cut.tar"))],
                                  tmp_path / "cut.parquet", FAST)  # fmt: skip
    (trunc,) = [r for r in cut.rejects if r["reason"] == "truncated_archive"]
    assert trunc["source"] == f"{tmp_path / 'cut.tar'}:{predicted[1][0]}"
    assert cut.summary["archive_errors"] == 1 and cut.summary["members"] == 3
    kept = {r["id"] for r in read_shard(tmp_path / "cut.parquet")}
    assert kept and all(i.startswith("AF-P10000") for i in kept)


def test_member_globs_read_one_format_and_skip_the_rest_quietly(tmp_path, predicted):
    name, data = predicted[0]
    afdb_bundle(tmp_path / "two.tar", [(name, data), (name.replace(".pdb.gz", ".json.gz"),
                                                       gzip.compress(b"{}"))])  # fmt: skip
    part = ArchivePart(str(tmp_path / "two.tar"), members=("*.pdb.gz",))
    res = process_structure_shard([part], tmp_path / "two.parquet", FAST)
    assert res.rejects == [] or all(r["reason"] != "not_a_structure" for r in res.rejects)
    assert res.summary["members"] == 1 and res.summary["members_skipped"] == 1
    stats = WalkStats()
    assert len(list(iter_members(tmp_path / "two.tar", STRUCTURE_MEMBERS, stats=stats))) == 1
    assert stats.skipped_names == [name.replace(".pdb.gz", ".json.gz")]


# --- config and planning --------------------------------------------------------------------


def _cfg(**d) -> PreprocessConfig:  # type: ignore[no-untyped-def]
    ds = DatasetConfig(**d)
    ds.validate()
    return PreprocessConfig(name="t", datasets=[ds])


def test_check_inputs_knows_the_formats(tmp_path, workspace):
    unit = tmp_path / "SRR1_Heavy_IGHG.csv.gz"
    unit.write_bytes(b"")
    tarball = jgi_tarball(tmp_path / "2506783001.tar.gz", {})
    fasta = tmp_path / "x.fasta"
    fasta.write_text(">a\nM\n")
    ok = check_inputs(_cfg(name="oas", type="sequence", format="oas", paths=[str(tmp_path / "*.csv.gz")],
                           levels=[0.95]), workspace, {"sequences"})  # fmt: skip
    assert ok.patterns["oas"] == [str(tmp_path / "*.csv.gz")]  # walked by the `list` stage
    with pytest.raises(ConfigError, match="not an OAS data unit"):
        check_inputs(_cfg(name="oas", type="sequence", format="oas", paths=[str(fasta)]),
                     workspace, {"sequences"})  # fmt: skip
    with pytest.raises(ConfigError, match="is an archive"):
        check_inputs(_cfg(name="jgi", type="sequence", paths=[str(tarball)], split=2),
                     workspace, {"sequences"})  # fmt: skip
    assert check_inputs(_cfg(name="jgi", type="sequence", paths=[str(tarball)]), workspace,
                        {"sequences"}).patterns["jgi"] == [str(tarball)]  # fmt: skip
    with pytest.raises(ConfigError, match="'split' is for FASTA"):
        _cfg(name="oas", type="sequence", format="oas", paths=[str(unit)], split=4)
    with pytest.raises(ConfigError, match="archive"):
        check_inputs(_cfg(name="afdb", type="structure", format="afdb", paths=[str(tarball)],
                          proxy_from_experimental=True), workspace, {"structures"})  # fmt: skip


def test_structure_shards_plan_files_then_bundle_parts(tmp_path, workspace):
    d = DatasetConfig(name="afdb", type="structure", format="afdb", paths=[], shard_size=2,
                      split=3, members=["*.cif.gz"])  # fmt: skip
    files = [tmp_path / f"f{i}.cif" for i in range(3)] + [tmp_path / "b.tar", tmp_path / "c.tar.gz"]
    for f in files:
        f.write_bytes(b"")
    lay = Layout(tmp_path / "data")
    key = listing_key([str(tmp_path / "*")], None)
    list_task(
        str(workspace), "r", "afdb", [str(tmp_path / "*")], str(lay.inventory("afdb")), key, None
    )
    inputs = Inputs({}, {}, [], [], listings={"afdb": load_listing(lay.inventory("afdb"), key)})
    shards = structure_shards(d, inputs, lay)
    # the driver holds inventory references; the task reads its rows
    assert [task_inputs(shards.inputs(i)) for i in range(2)] == [
        [str(f) for f in files[:2]], [str(files[2])]]  # fmt: skip
    assert [task_inputs(shards.inputs(i)) for i in range(2, 8)] == [
        [ArchivePart(str(f), k, 3, ("*.cif.gz",))] for f in files[3:] for k in range(3)]  # fmt: skip
    assert [Path(p).name for p in shards.paths()] == [f"{i:05d}.parquet" for i in range(8)]
