"""Augmentations on real structures (MDAnalysisTests PDB/mmCIF files read with biotite)."""

from __future__ import annotations

import gzip
from functools import cache
from pathlib import Path

import numpy as np
import pytest

from esm3.tasks import augment
from esm3.tasks.masking import span_mask
from esm3.tasks.sample import Protein
from tests.realdata import mda_file


def _read(path: Path):
    import biotite.structure.io.pdb as pdb
    import biotite.structure.io.pdbx as pdbx

    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as fh:
        if ".cif" in path.name:
            return pdbx.get_structure(pdbx.CIFFile.read(fh), model=1)
        return pdb.PDBFile.read(fh).get_structure(model=1)


@cache
def _chains(name: str) -> tuple[Protein, ...]:
    import biotite.structure as struc
    from biotite.sequence import ProteinSequence

    atoms = _read(mda_file(name))
    # CHARMM names histidine by protonation state (HSD/HSE/HSP): standard name first
    atoms.res_name[np.isin(atoms.res_name, ["HSD", "HSE", "HSP"])] = "HIS"
    atoms = atoms[struc.filter_amino_acids(atoms) & ~atoms.hetero]
    out = []
    for chain in np.unique(atoms.chain_id):
        ch = atoms[atoms.chain_id == chain]
        starts = struc.get_residue_starts(ch)
        L = len(starts)
        coords = np.full((L, 3, 3), np.nan, dtype=np.float32)
        res_of_atom = np.searchsorted(starts, np.arange(ch.array_length()), side="right") - 1
        for k, name_ in enumerate(("N", "CA", "C")):
            sel = ch.atom_name == name_
            coords[res_of_atom[sel], k] = ch.coord[sel]
        letters = []
        for r in ch.res_name[starts]:
            try:
                letters.append(ProteinSequence.convert_letter_3to1(r))
            except KeyError:
                letters.append("X")
        seq = "".join(letters).upper()
        out.append(Protein(sequence=seq, coords=coords, id=f"{name}:{chain}", dataset="mda"))
    return tuple(out)


def real_protein(name: str, chain: int = 0) -> Protein:
    """One chain of a real structure as a Protein (coords N/CA/C, NaN where missing)."""
    return _chains(name)[chain]


def real_proteins() -> list[Protein]:
    """A handful of real single chains of different lengths."""
    return [
        real_protein("adk_open.pdb"),
        real_protein("5PTI.cif.gz"),
        real_protein("1BD2.cif.gz", 0),
        real_protein("3KPR.cif.gz", 0),
    ]


def _ca(p: Protein) -> tuple[np.ndarray, np.ndarray]:
    ca = p.coords[:, 1]
    return ca, np.isfinite(ca).all(axis=1)


def test_real_structures_load():
    prots = real_proteins()
    assert len(prots[0]) == 214  # adenylate kinase
    assert len(prots[1]) == 58  # BPTI
    for p in prots:
        ca, ok = _ca(p)
        assert ok.mean() > 0.9
        step = np.linalg.norm(np.diff(ca[ok], axis=0), axis=1)
        assert np.median(step) == pytest.approx(3.8, abs=0.1)  # CA-CA virtual bond


def test_coordination_triplets_are_mutual_contacts_far_in_sequence():
    # CA-CA < 6 A triplets >= 10 apart are rare: chain A of 1BD2 (HLA-A2) has three
    p = real_protein("1BD2.cif.gz", 0)
    ca, ok = _ca(p)
    index = np.arange(len(p))
    sizes = []
    for seed in range(200):
        got = augment.coordination_residues(ca, ok, index, np.random.default_rng(seed))
        assert got is not None
        triplet, shown = got
        for x in range(3):
            for y in range(x + 1, 3):
                a, b = triplet[x], triplet[y]
                assert np.linalg.norm(ca[a] - ca[b]) < 6.0
                assert abs(int(a) - int(b)) >= 10
        assert set(triplet.tolist()) <= set(shown.tolist())
        extra = set(shown.tolist()) - set(triplet.tolist())
        assert all(min(abs(e - t) for t in triplet) == 1 for e in extra)
        sizes.append(shown.size)
    assert min(sizes) >= 3 and max(sizes) <= 9
    assert np.mean(sizes) == pytest.approx(6.0, abs=0.5)  # 3 + 6 neighbours * 0.5


def test_coordination_none_on_real_chain_without_triplet():
    p = real_protein("adk_open.pdb")  # 69 contacts, none mutual in threes
    ca, ok = _ca(p)
    assert (
        augment.coordination_residues(ca, ok, np.arange(len(p)), np.random.default_rng(0)) is None
    )


def test_coordination_none_without_triplet():
    # a straight line of residues 3.8 A apart: no contacts >= 10 apart in sequence
    ca = np.stack([np.arange(40) * 3.8, np.zeros(40), np.zeros(40)], axis=1)
    got = augment.coordination_residues(
        ca, np.ones(40, bool), np.arange(40), np.random.default_rng(0)
    )
    assert got is None


def test_interface_segments_respect_randint_bounds():
    p = real_protein("adk_open.pdb")
    ca, ok = _ca(p)
    L = len(p)
    for seed in range(300):
        got = augment.interface_segments(ca, ok, np.random.default_rng(seed))
        assert got is not None
        (a, b), (c, d) = got[0]
        i, j = got[1]
        s1, e1, s2, e2 = a + 1, b, c + 1, d  # back to 1-based inclusive
        assert np.linalg.norm(ca[i - 1] - ca[j - 1]) < 8.0 and j - i >= 24
        assert 1 <= s1 <= i - 3 and i + 3 <= e1 <= j - 15
        assert i + 15 <= s2 <= j - 3 and j + 15 <= e2 <= L
        assert s1 <= i <= e1 and s2 <= j <= e2  # each chain holds its side of the contact
        assert s2 > e1 + 1  # a residue gap between the chains


def test_gap_segments_invariants():
    rng = np.random.default_rng(0)
    counts = []
    for L in (30, 120, 214, 1000):
        for _ in range(2000):
            segs = augment.gap_segments(L, rng)
            counts.append(len(segs))
            assert 1 <= len(segs) <= 9
            assert segs[0][0] >= 0 and segs[-1][1] <= L
            for (s, e), (s2, _) in zip(segs, segs[1:], strict=False):
                assert e > s and s2 - e >= 10
    counts = np.asarray(counts)
    assert np.mean(counts == 1) == pytest.approx(0.9, abs=0.02)  # Geometric(0.9)


def test_gap_segments_many_chains_and_dirichlet_lengths():
    rng = np.random.default_rng(1)
    firsts, lasts = [], []
    for _ in range(3000):
        segs = augment.gap_segments(400, rng, p=0.01, max_chains=3)
        if len(segs) < 3:  # Geometric(0.01) is 1 or 2 about 2% of the time
            continue
        firsts.append(segs[0][1] - segs[0][0])
        lasts.append(segs[-1][1] - segs[-1][0])
    assert len(firsts) > 2800
    # identically distributed chain lengths (symmetric Dirichlet)
    assert np.mean(firsts) == pytest.approx(np.mean(lasts), rel=0.06)
    assert np.mean(firsts) == pytest.approx(1 + (400 - 3 - 20) / 5, rel=0.06)


def test_gap_segments_short_protein_stays_one_chain():
    rng = np.random.default_rng(0)
    assert all(len(augment.gap_segments(10, rng, p=0.01)) == 1 for _ in range(50))


def test_span_mask_count_and_runs():
    rng = np.random.default_rng(0)
    for rate in (0.0, 0.1, 0.5, 0.93, 1.0):
        for _ in range(200):
            m = span_mask(512, rate, rng, max_spans=8)
            assert m.sum() == round(rate * 512)
            runs = np.sum(np.diff(m.astype(int)) == 1) + int(m[0])
            assert runs <= 8
