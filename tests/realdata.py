"""Where the real test data lives: packages installed by `make setup`, never downloads."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

UNIPROT_FASTA = Path("/usr/share/doc/mmseqs2/example-data/DB.fasta.gz")  # Debian mmseqs2-examples


def uniprot_fasta() -> Path:
    """20,000 real UniProt sequences shipped by Debian's mmseqs2-examples."""
    if not UNIPROT_FASTA.exists():
        pytest.skip("mmseqs2-examples not installed (make setup installs it)")
    return UNIPROT_FASTA


def mda_datafiles() -> Path:
    """The folder of real PDB/mmCIF files shipped by MDAnalysisTests."""
    spec = importlib.util.find_spec("MDAnalysisTests")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("MDAnalysisTests not installed (make setup installs it with --no-deps)")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def mda_file(name: str) -> Path:
    """A file from MDAnalysisTests' data folder by (case-insensitive) name or glob."""
    root = mda_datafiles()
    hits = sorted(root.rglob(name)) or sorted(
        p for p in root.rglob("*") if p.name.lower() == name.lower()
    )
    if not hits:
        pytest.skip(f"{name} not found in MDAnalysisTests data")
    return hits[0]
