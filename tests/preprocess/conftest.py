"""Inputs and configs for the preprocessing orchestration tests: subsets of the real
UniProt sequences (mmseqs2-examples) and real structures (MDAnalysisTests)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.realdata import mda_file, uniprot_entries

N_SEQUENCES = 800  # first records of mmseqs2-examples (purge search costs ~25 ms each)


# records planted into the subset so that ingest has something to refuse
def _fasta_records(n: int, skip: int = 0) -> list[str]:
    """Records skip .. skip+n of the real UniProt file, each as its FASTA text."""
    return [h + body for h, body in uniprot_entries(n, skip)]


PLANTED = (
    ">sp|ZZBAD1|BAD_JLETTER planted: J is not an amino-acid letter\nMKTAYIAKQRJQISFVKSHFSRQ\n"
    ">sp|ZZBAD2|BAD_EMPTY planted: a header with no sequence\n"
)


@pytest.fixture(scope="session")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 2,000-sequence UniRef-like file with planted bad records and one duplicate id,
    a 200-sequence JGI-like file, and a handful of real structure files plus an empty one."""
    d = tmp_path_factory.mktemp("inputs")
    recs = _fasta_records(N_SEQUENCES)
    uniref = d / "uniref.fasta"
    uniref.write_text("".join(recs[:400]) + recs[5] + PLANTED + "".join(recs[400:]))
    jgi = d / "jgi.fasta"
    jgi.write_text("".join(_fasta_records(200, skip=N_SEQUENCES)))
    empty = d / "EMPTY.cif"
    empty.write_text("")
    return {
        "uniref": uniref,
        "jgi": jgi,
        "empty": empty,
        "5pti": mda_file("5PTI.cif.gz"),
        "1yjp": mda_file("1YJP.cif.gz"),
        "7etn": mda_file("7ETN.cif.gz"),
        "4e43": mda_file("4E43.pdb"),
    }


def write_config(path: Path, inputs: dict[str, Path], *, name: str = "t") -> Path:
    """The test config: two sequence datasets (two levels with expansion; one level only),
    a PDB dataset and an AFDB-style one derived from experimental structures, and the
    demo's stand-in InterPro and site files as labels."""
    i = {k: str(v) for k, v in inputs.items()}
    path.write_text(f"""
name = "{name}"
seed = 3
[purge]
validation_size = 100
[tokens]
budget = 5_000_000
[codebook]
size = 8
iterations = 10
[[datasets]]
name = "uniref"
type = "sequence"
paths = ["{i["uniref"]}"]
levels = [0.7, 0.9]
split = 2
release = "test"
weight = 2.0
[[datasets]]
name = "jgi"
type = "sequence"
paths = ["{i["jgi"]}"]
levels = [0.7]
release = "test"
[[datasets]]
name = "pdb"
type = "structure"
format = "pdb"
paths = ["{i["5pti"]}", "{i["1yjp"]}", "{i["7etn"]}", "{i["empty"]}"]
levels = [0.7, 1.0]
also_unclustered = true
shard_size = 2
release = "test"
[[datasets]]
name = "afdb"
type = "structure"
format = "afdb"
paths = ["{i["5pti"]}", "{i["4e43"]}", "{i["1yjp"]}"]
proxy_from_experimental = true
shard_size = 2
release = "test"
[structures]
sasa_points = 100
[interpro]
protein2ipr = ["{{package:jobs}}/configs/preprocess/demo-labels/protein2ipr-standin.tsv.gz"]
sites = ["{{package:jobs}}/configs/preprocess/demo-labels/sites-standin.tsv.gz"]
entry_list = "{{package:jobs}}/configs/preprocess/demo-labels/entry-standin.list"
min_site_proteins = 1
[resources.cluster]
cpus_per_task = 2
[resources.purge]
cpus_per_task = 2
""")
    return path
