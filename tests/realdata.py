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


def uniprot_entries(n: int, skip: int = 0) -> list[tuple[str, str]]:
    """Records skip .. skip+n of the real UniProt file as (header line with '>' and newline,
    sequence lines as written)."""
    import gzip

    out: list[tuple[str, str]] = []
    with gzip.open(uniprot_fasta(), "rt") as f:
        for line in f:
            if line.startswith(">"):
                if len(out) >= n + skip:
                    break
                out.append((line, ""))
            else:
                out[-1] = (out[-1][0], out[-1][1] + line)
    return out[skip : skip + n]


def described_sequences(n: int, skip: int = 0) -> list[tuple[str, str]]:
    """(description, sequence) of real UniProt records (the header's text before ' OS=')."""
    return [(h.split(" ", 1)[1].split(" OS=")[0], body.replace("\n", ""))
            for h, body in uniprot_entries(n, skip)]  # fmt: skip


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
