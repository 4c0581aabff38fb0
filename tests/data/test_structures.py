"""Structure readers, filters, SASA, SS8 and the shard stage on real PDB/mmCIF files."""

from __future__ import annotations

import gzip
import os
import shutil
import stat
import subprocess
from pathlib import Path

import biotite.structure as bs
import biotite.structure.io.pdb as pdb
import biotite.structure.io.pdbx as pdbx
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from esm3.data.structures.filters import (
    AFDBFilter,
    PDBFilter,
    check_afdb_chain,
    check_pdb_entry,
    normalize_plddt,
    pdb_entity_groups,
    read_esmatlas_metadata,
)
from esm3.data.structures.geometry import long_range_contacts
from esm3.data.structures.io import StructureReadError, read_structure
from esm3.data.structures.records import STRUCTURE_SCHEMA, read_shard
from esm3.data.structures.sasa import residue_sasa
from esm3.data.structures.ss8 import SS8_ALPHABET, DsspError, chain_ss8, file_ss8
from esm3.data.structures.stages import (
    StructureStageConfig,
    process_structure_shard,
    structure_dataset_stats,
)
from esm3.tool import Tool, ToolError
from tests.realdata import mda_file

needs_mkdssp = pytest.mark.skipif(
    shutil.which("mkdssp") is None, reason="mkdssp not installed (apt-get install dssp)"
)


def _text(path: Path) -> str:
    raw = path.read_bytes()
    return (gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw).decode()


def _heavy_protein(atoms: bs.AtomArray) -> bs.AtomArray:
    return atoms[bs.filter_amino_acids(atoms) & ~np.isin(atoms.element, ["H", "D"])]


def _write_predicted(src: Path, dst: Path, plddt_per_residue, residues=None) -> Path:
    """A predicted-structure file made from a real structure: pLDDT written into the
    B-factor column (as AFDB and ESMFold do), optionally keeping only `residues`."""
    with gzip.open(src, "rt") as f:
        atoms = pdbx.get_structure(pdbx.CIFFile.read(f), model=1, extra_fields=["b_factor"])
    atoms = _heavy_protein(atoms)
    starts = bs.get_residue_starts(atoms)
    res_idx = np.repeat(np.arange(len(starts)), np.diff(np.append(starts, len(atoms))))
    if residues is not None:
        atoms, res_idx = atoms[np.isin(res_idx, residues)], res_idx[np.isin(res_idx, residues)]
        res_idx = np.searchsorted(np.unique(res_idx), res_idx)
    atoms.b_factor = np.asarray(plddt_per_residue, dtype=np.float32)[res_idx]
    f = pdb.PDBFile()
    f.set_structure(atoms)
    f.write(str(dst))
    return dst


@pytest.fixture(scope="module")
def pti() -> Path:
    return mda_file("5PTI.cif.gz")


# --- readers --------------------------------------------------------------------------------


def test_metadata_from_mmcif_and_pdb_agree():
    cif = read_structure(mda_file("1BD2.cif.gz"))
    pdbf = read_structure(mda_file("1BD2.pdb.gz"))
    for e in (cif, pdbf):
        assert e.meta.method == "X-RAY DIFFRACTION"
        assert e.meta.resolution == pytest.approx(2.5)
        assert e.meta.deposition_date == "1998-05-12"
        assert [c.chain_id for c in e.chains] == ["A", "B", "C", "D", "E"]
        assert e.chains[0].accession == "P01892"  # HLA-A2 heavy chain (SIFTS / DBREF)
        assert e.chains[1].accession == "P61769"  # beta-2-microglobulin
    for a, b in zip(cif.chains, pdbf.chains, strict=True):
        assert a.sequence == b.sequence
        assert a.entity == b.entity
        np.testing.assert_allclose(a.backbone, b.backbone, atol=1e-3, equal_nan=True)
        np.testing.assert_array_equal(a.uniprot_pos, b.uniprot_pos)
    # chain A residue 1 is UniProt P01892 position 25 (signal peptide removed)
    assert cif.chains[0].uniprot_pos[0] == 25


def test_backbone_shape_units_and_sequence(pti):
    e = read_structure(pti)
    (chain,) = e.chains
    assert chain.sequence == "RPDFCLEPPYTGPCKARIIRYFYNAKAGLCQTFVYGGCRAKRNNFKSAEDCMRTCGGA"
    assert chain.backbone.shape == (58, 3, 3) and chain.backbone.dtype == np.float32
    # N-CA and CA-C bond lengths of a real protein, in Angstrom
    n_ca = np.linalg.norm(chain.backbone[:, 0] - chain.backbone[:, 1], axis=1)
    ca_c = np.linalg.norm(chain.backbone[:, 1] - chain.backbone[:, 2], axis=1)
    assert np.all(np.abs(n_ca - 1.46) < 0.1) and np.all(np.abs(ca_c - 1.52) < 0.1)
    assert not np.isin(chain.atoms.element, ["H", "D"]).any()  # neutron D/H dropped
    assert e.meta.method == "X-RAY DIFFRACTION;NEUTRON DIFFRACTION"


def test_plain_gzipped_and_binarycif_read_the_same(tmp_path):
    plain = read_structure(mda_file("1YJP.cif"))
    gz = read_structure(mda_file("1YJP.cif.gz"))
    cif = pdbx.CIFFile.read(mda_file("1YJP.cif"))
    atoms = pdbx.get_structure(cif, model=1, extra_fields=["b_factor", "label_entity_id"])
    b = pdbx.BinaryCIFFile()
    b["1YJP"] = pdbx.BinaryCIFBlock()
    pdbx.set_structure(b, atoms)
    b.block["exptl"] = pdbx.BinaryCIFCategory({"method": ["X-RAY DIFFRACTION"]})
    b.block["pdbx_database_status"] = pdbx.BinaryCIFCategory(
        {"recvd_initial_deposition_date": ["2005-01-15"]}
    )
    b.write(tmp_path / "1yjp.bcif")
    with open(tmp_path / "1yjp.bcif", "rb") as src, gzip.open(tmp_path / "x.bcif.gz", "wb") as d:
        d.write(src.read())
    for path in (tmp_path / "1yjp.bcif", tmp_path / "x.bcif.gz"):
        e = read_structure(path)
        assert e.meta.format == "bcif"
        assert e.meta.deposition_date == "2005-01-15"
        assert e.chains[0].sequence == plain.chains[0].sequence == "GNNQQNY"
        np.testing.assert_allclose(e.chains[0].backbone, plain.chains[0].backbone, atol=1e-3)
    np.testing.assert_array_equal(gz.chains[0].backbone, plain.chains[0].backbone)


def test_missing_backbone_atom_gives_nan():
    # MDAnalysisTests' 1YJP_invalid renames residue 1's N to X
    (chain,) = read_structure(mda_file("1YJP_invalid.cif.gz")).chains
    assert np.isnan(chain.backbone[0, 0]).all() and not np.isnan(chain.backbone[0, 1:]).any()
    assert chain.complete_backbone.tolist() == [False] + [True] * 6


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda p: p.write_bytes(b""), "empty"),
        (lambda p: p.write_bytes(mda_file("1BD2.cif.gz").read_bytes()[:3000]), "unreadable"),
        (lambda p: p.write_text("HEADER    nothing\nEND\n"), "no_protein_chain"),
    ],
    ids=["empty", "truncated-gzip", "no-atoms"],
)
def test_bad_files_raise_clear_errors(tmp_path, make, reason):
    path = tmp_path / "bad.cif.gz" if reason == "unreadable" else tmp_path / "bad.pdb"
    make(path)
    with pytest.raises(StructureReadError) as err:
        read_structure(path)
    assert err.value.reason == reason
    assert str(path) in str(err.value)


def test_hetatm_only_file_has_no_protein_chain(tmp_path, pti):
    # 5PTI's own HETATM records (phosphate, water) without its protein
    lines = [x for x in _text(pti).splitlines() if not x.startswith("ATOM ")]
    (tmp_path / "het.cif").write_text("\n".join(lines) + "\n")
    with pytest.raises(StructureReadError, match="no_protein_chain"):
        read_structure(tmp_path / "het.cif")


# --- filters --------------------------------------------------------------------------------


def test_pdb_filter_decides_as_the_metadata_says(tmp_path):
    cfg = PDBFilter()
    ok = read_structure(mda_file("3PWP.cif.gz")).meta
    assert check_pdb_entry(ok.method, ok.resolution, ok.deposition_date, cfg) is None
    late = read_structure(mda_file("7ETN.cif.gz")).meta
    assert late.deposition_date == "2021-05-13"
    reason, detail = check_pdb_entry(late.method, late.resolution, late.deposition_date, cfg)
    assert reason == "deposited_after" and "2021-05-13" in detail
    nmr = read_structure(mda_file("nmr_neopetrosiamide.pdb")).meta
    assert check_pdb_entry(nmr.method, nmr.resolution, nmr.deposition_date, cfg)[0] == "method"
    em = read_structure(mda_file("5a7u.pdb")).meta  # electron microscopy, 4.8 A
    assert check_pdb_entry(em.method, em.resolution, em.deposition_date, cfg)[0] == "method"
    # a real X-ray file edited to 9.5 A resolution
    text = _text(mda_file("1YJP.cif"))
    text = text.replace(
        "_refine.ls_d_res_high                            1.80", "_refine.ls_d_res_high 9.50"
    )
    text = text.replace(
        "_reflns.d_resolution_high            1.80", "_reflns.d_resolution_high 9.50"
    )
    (tmp_path / "lowres.cif").write_text(text)
    low = read_structure(tmp_path / "lowres.cif").meta
    assert low.resolution == pytest.approx(9.5)
    reason, detail = check_pdb_entry(low.method, low.resolution, low.deposition_date, cfg)
    assert reason == "resolution" and "9.5" in detail
    # thresholds are config values
    loose = PDBFilter(deposited_before="2030-01-01", max_resolution=10.0)
    assert check_pdb_entry(late.method, late.resolution, late.deposition_date, loose) is None
    assert check_pdb_entry(low.method, low.resolution, low.deposition_date, loose) is None


def test_long_range_contacts_against_brute_force(pti):
    bb = read_structure(pti).chains[0].backbone
    ca = bb[:, 1].astype(np.float64)
    brute = sum(
        1
        for i in range(len(ca))
        for j in range(i + 13, len(ca))
        if np.linalg.norm(ca[i] - ca[j]) < 8.0
    )
    assert long_range_contacts(bb) == brute > 0
    bb2 = bb.copy()
    bb2[5, 1] = np.nan  # a residue without CA has no contacts
    assert long_range_contacts(bb2) < brute


def test_afdb_filter_on_plddt_and_globularity(pti):
    bb = read_structure(pti).chains[0].backbone
    cfg = AFDBFilter()
    assert check_afdb_chain(np.full(58, 0.9), bb, cfg) is None
    assert check_afdb_chain(np.full(58, 0.6), bb, cfg)[0] == "plddt"
    # BPTI's C-terminal helix alone has no contact > 12 apart: not globular
    assert check_afdb_chain(np.full(14, 0.9), bb[44:], cfg)[0] == "contacts"
    np.testing.assert_allclose(normalize_plddt(np.array([70.0, 95.0])), [0.7, 0.95], rtol=1e-6)
    np.testing.assert_allclose(normalize_plddt(np.array([0.7, 0.95])), [0.7, 0.95], rtol=1e-6)


def test_entity_groups():
    rows = [
        {"id": "3KPR_A", "entry": "3kpr", "entity": "1"},
        {"id": "3KPR_F", "entry": "3KPR", "entity": "1"},
        {"id": "3KPR_B", "entry": "3KPR", "entity": "2"},
    ]
    assert pdb_entity_groups(rows) == {"3KPR_1": ["3KPR_A", "3KPR_F"], "3KPR_2": ["3KPR_B"]}


# --- SASA and SS8 against the tools called directly ----------------------------------------


def test_sasa_equals_biotite_called_directly(pti):
    (chain,) = read_structure(pti).chains
    ours = residue_sasa(chain.atoms, chain.complete_backbone)
    with gzip.open(pti, "rt") as f:
        atoms = _heavy_protein(pdbx.get_structure(pdbx.CIFFile.read(f), model=1))
    direct = bs.apply_residue_wise(atoms, bs.sasa(atoms), np.nansum)
    np.testing.assert_allclose(ours, direct, rtol=1e-5)
    assert ours.dtype == np.float32 and (ours >= 0).all() and ours.sum() > 3000


def test_sasa_is_nan_where_backbone_is_missing():
    (chain,) = read_structure(mda_file("1YJP_invalid.cif.gz")).chains
    s = residue_sasa(chain.atoms, chain.complete_backbone)
    assert np.isnan(s[0]) and np.isfinite(s[1:]).all()


@needs_mkdssp
def test_ss8_equals_mkdssp_called_directly(tmp_path, pti):
    (tmp_path / "5pti.cif").write_text(_text(pti))
    subprocess.run(
        ["mkdssp", "--output-format", "dssp", tmp_path / "5pti.cif", tmp_path / "out.dssp"],
        check=True,
        capture_output=True,
    )
    lines = (tmp_path / "out.dssp").read_text().splitlines()
    body = lines[[i for i, x in enumerate(lines) if x.startswith("  #  RESIDUE")][0] + 1 :]
    raw = "".join(x[16] for x in body if x[13] != "!")
    assert "P" in raw and " " in raw  # DSSP 4 codes that the paper's alphabet lacks
    expected = raw.replace(" ", "C").replace("P", "C")
    (chain,) = read_structure(pti).chains
    ss8 = chain_ss8(chain.atoms)
    assert ss8 == expected
    assert set(ss8) <= set(SS8_ALPHABET) and {"H", "E", "G"} <= set(ss8)


@needs_mkdssp
@pytest.mark.parametrize("name", ["1BD2.pdb.gz", "3PWP.cif.gz"])
def test_one_mkdssp_call_per_file_equals_mkdssp_per_chain(tmp_path, name):
    # both complexes: mkdssp on the chains left in place assigns a residue differently
    chains = [c.atoms for c in read_structure(mda_file(name)).chains]
    assert len(chains) >= 5
    counting = _fake_mkdssp(tmp_path, f'echo call >> {tmp_path}/calls\nexec mkdssp "$@"\n')
    assert file_ss8(chains, tool=counting) == [chain_ss8(a) for a in chains]
    assert (tmp_path / "calls").read_text().count("call") == 1


def test_one_mkdssp_call_per_file_falls_back_per_chain(tmp_path, pti):
    # the shared call fails: each chain runs alone and gets its own error
    tool = _fake_mkdssp(tmp_path, f'echo call >> {tmp_path}/calls\necho "bad input" >&2\nexit 3\n')
    (chain,) = read_structure(pti).chains
    found = file_ss8([chain.atoms, chain.atoms], tool=tool)
    assert [type(e) for e in found] == [ToolError, ToolError] and "bad input" in str(found[1])
    assert (tmp_path / "calls").read_text().count("call") == 3


def _fake_mkdssp(tmp_path: Path, body: str) -> Tool:
    script = tmp_path / "fake-mkdssp"
    script.write_text(
        '#!/bin/sh\nif [ "$1" = "--version" ]; then echo "mkdssp version 4.2.2"; exit 0; fi\n'
        + body
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return Tool(str(script), version_pattern=r"mkdssp version (\S+)", min_version=(4,))


def test_ss8_failing_mkdssp_raises_with_stderr(tmp_path, pti):
    tool = _fake_mkdssp(tmp_path, 'echo "cannot parse input" >&2\nexit 3\n')
    (chain,) = read_structure(pti).chains
    with pytest.raises(ToolError, match="cannot parse input"):
        chain_ss8(chain.atoms, tool=tool)


def test_ss8_guards_silent_zero_residue_output(tmp_path, pti):
    # mkdssp 4 exits 0 with no residues on some inputs; a fake reproduces that
    tool = _fake_mkdssp(tmp_path, 'for a; do out="$a"; done\n: > "$out"\nexit 0\n')
    (chain,) = read_structure(pti).chains
    with pytest.raises(DsspError, match="0 of 58 residues"):
        chain_ss8(chain.atoms, tool=tool)


# --- the shard stage ------------------------------------------------------------------------


@needs_mkdssp
def test_pdb_shard_with_bad_files_completes(tmp_path):
    good = [mda_file("1YJP.cif.gz"), mda_file("3KPR.pdb.gz")]
    (tmp_path / "empty.cif").write_text("")
    (tmp_path / "trunc.pdb.gz").write_bytes(mda_file("1BD2.pdb.gz").read_bytes()[:5000])
    (tmp_path / "het.pdb").write_text(
        "HEADER    TEST                                    01-JAN-99   XXXX\n"
        "HETATM    1  O   HOH A   1       1.000   2.000   3.000  1.00 10.00           O\nEND\n"
    )
    text = _text(mda_file("1YJP.cif"))
    no_ca = "\n".join(x for x in text.splitlines() if not (x.startswith("ATOM") and " CA " in x))
    (tmp_path / "noca.cif").write_text(no_ca + "\n")
    files = [
        tmp_path / "empty.cif",
        good[0],
        tmp_path / "trunc.pdb.gz",
        tmp_path / "het.pdb",
        tmp_path / "noca.cif",
        mda_file("7ETN.cif.gz"),
        mda_file("nmr_neopetrosiamide.pdb"),
        good[1],
    ]
    out = tmp_path / "shard.parquet"
    summary, rejects = process_structure_shard(files, out, StructureStageConfig("pdb"))
    by_source = {(Path(r["source"]).name, r["reason"]) for r in rejects}
    assert ("empty.cif", "empty") in by_source
    assert ("trunc.pdb.gz", "unreadable") in by_source
    assert ("het.pdb", "no_protein_chain") in by_source
    assert ("noca.cif", "no_backbone") in by_source
    assert ("7ETN.cif.gz", "deposited_after") in by_source
    assert ("nmr_neopetrosiamide.pdb", "method") in by_source
    assert sum(r["reason"] == "same_entity" for r in rejects) == 5  # 3KPR F-J repeat A-E
    assert set(rejects[0]) == {"stage", "source", "record", "reason", "detail"}
    rows = read_shard(out)
    assert [r["id"] for r in rows] == ["1YJP_A"] + [f"3KPR_{c}" for c in "ABCDE"]
    assert summary["files"] == 8 and summary["chains_kept"] == 6
    assert summary["files_unreadable"] == 3 and summary["entries_filtered"] == 2
    assert pq.read_schema(out).names == STRUCTURE_SCHEMA.names
    r = rows[0]
    assert len(r["coords"]) == 9 * len(r["sequence"]) and len(r["ss8"]) == len(r["sequence"])
    assert r["plddt"] is None and r["sasa"] is None  # Table S5: no SASA for PDB
    assert r["accession"] == "P05453" and r["deposition_date"] == "2005-01-15"
    # done shards are skipped and report what they stored
    again = process_structure_shard(files, out, StructureStageConfig("pdb"))
    assert again.summary["skipped"] is True and again.rejects == rejects


def test_missing_mkdssp_is_a_clear_error_before_any_file(tmp_path, monkeypatch, pti):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ToolError, match="mkdssp: not found"):
        process_structure_shard([pti], tmp_path / "o.parquet", StructureStageConfig("pdb"))
    assert not (tmp_path / "o.parquet").exists()


def test_failing_mkdssp_rejects_chains_and_the_shard_completes(tmp_path, pti):
    tool = _fake_mkdssp(tmp_path, 'echo "segfault in dssp" >&2\nexit 139\n')
    files = [pti, mda_file("1YJP.cif.gz")]
    summary, rejects = process_structure_shard(
        files, tmp_path / "o.parquet", StructureStageConfig("pdb"), dssp=tool
    )
    assert [r["record"] for r in rejects] == ["5PTI_A", "1YJP_A"]
    assert all(r["reason"] == "ss8_failed" and "segfault" in r["detail"] for r in rejects)
    assert summary["files"] == 2 and read_shard(tmp_path / "o.parquet") == []


@needs_mkdssp
def test_afdb_shard_from_predicted_files(tmp_path, pti):
    """AFDB-style files made from real 5PTI: pLDDT (0-100) written into the B-factor column."""
    rng = np.random.default_rng(0)
    good_plddt = rng.uniform(75, 98, 58)
    good = _write_predicted(pti, tmp_path / "AF-P00974-F1-model_v4.pdb", good_plddt)
    low = _write_predicted(pti, tmp_path / "AF-P00975-F1-model_v4.pdb", np.full(58, 50.0))
    helix = _write_predicted(
        pti, tmp_path / "AF-P00976-F1-model_v4.pdb", np.full(14, 90.0), residues=range(44, 58)
    )
    summary, rejects = process_structure_shard(
        [good, low, helix], tmp_path / "afdb.parquet", StructureStageConfig("afdb")
    )
    assert {(r["record"], r["reason"]) for r in rejects} == {
        ("AF-P00975-F1-model_v4_A", "plddt"),
        ("AF-P00976-F1-model_v4_A", "contacts"),
    }
    (row,) = read_shard(tmp_path / "afdb.parquet")
    assert row["id"] == "AF-P00974-F1-model_v4" and row["accession"] == "P00974"
    np.testing.assert_allclose(row["plddt"], good_plddt / 100, atol=1e-3)  # 2 decimals in PDB
    assert row["mean_plddt"] == pytest.approx(good_plddt.mean() / 100, abs=1e-3)
    assert len(row["sasa"]) == 58 and np.isfinite(row["sasa"]).all()  # SASA on for AFDB
    assert set(row["ss8"]) <= set(SS8_ALPHABET)


@needs_mkdssp
@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_esmatlas_filter_uses_the_metadata_table(tmp_path, pti, fmt):
    # ESMFold writes pLDDT on 0-1; made from real 5PTI as above
    files = [
        _write_predicted(pti, tmp_path / f"MGYP00000000000{i}.pdb", np.full(58, 0.8))
        for i in (1, 2, 3)
    ]
    meta = pd.DataFrame(
        {"id": ["MGYP000000000001", "MGYP000000000002"], "plddt": [85.0, 90.0], "ptm": [0.8, 0.5]}
    )
    table = tmp_path / f"meta.{fmt}"
    meta.to_csv(table, index=False) if fmt == "csv" else meta.to_parquet(table)
    assert read_esmatlas_metadata(table)["MGYP000000000001"] == pytest.approx((0.85, 0.8))
    summary, rejects = process_structure_shard(
        files,
        tmp_path / "atlas.parquet",
        StructureStageConfig("esmatlas", ss8=False, sasa=False),
        esmatlas_metadata=table,
    )
    assert {(r["record"], r["reason"]) for r in rejects} == {
        ("MGYP000000000002_A", "ptm"),
        ("MGYP000000000003_A", "no_metadata"),
    }
    (row,) = read_shard(tmp_path / "atlas.parquet")
    assert row["ptm"] == pytest.approx(0.8) and row["mean_plddt"] == pytest.approx(0.85)
    np.testing.assert_allclose(row["plddt"], 0.8, atol=1e-6)  # 0-1 scale left as is


def test_dataset_stats_row(tmp_path):
    out = tmp_path / "s.parquet"
    files = [mda_file("1YJP.cif.gz"), mda_file("3PWP.cif.gz")]
    process_structure_shard(files, out, StructureStageConfig("pdb", ss8=False))
    row = structure_dataset_stats(
        [out], "PDB", "before 2020-05-01", clusters={"3PWP_A": "x", "3PWP_B": "x", "1YJP_A": "y"}
    )
    lengths = [7, 275, 100, 9, 200, 245]
    assert row["sequences"] == 6 and row["avg_length"] == pytest.approx(np.mean(lengths))
    assert row["tokens"] == sum(lengths)
    assert row["clustering_count"] == 2 and row["type"] == "structure"
    from esm3.metrics.schema import TABLES

    # the stage that records the row adds the key of the output it describes
    assert set(row) | {"output_key"} == set(TABLES["dataset_stats"].names)


def test_nothing_left_behind(tmp_path, pti):
    out = tmp_path / "x" / "s.parquet"
    process_structure_shard([pti], out, StructureStageConfig("pdb", ss8=False))
    assert sorted(os.listdir(out.parent)) == ["s.parquet"]  # no temporary files
