"""8-class secondary structure (SS8) per residue with mkdssp 4, through `esm3.tool.MKDSSP`.

The chain is written as a PDB file with residues renumbered 1..L on chain A, so the DSSP
residue number is the residue's position; mkdssp 4 needs the HEADER line it gets here.
DSSP codes: H (alpha helix), B (bridge), E (strand), G (3-10 helix), I (pi helix),
T (turn), S (bend), ' ' (loop) and, since DSSP 4, P (polyproline II). The paper's
vocabulary is `GHITEBSC`: ' ' and P become C. Residues DSSP does not assign (incomplete
backbone, chain breaks) are C as well; their coordinates are NaN in the record, so a loader
can tell them apart.
"""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import biotite.structure as bs
import biotite.structure.io.pdb as pdb
import numpy as np

from esm3.tool import MKDSSP, Tool, ToolError

SS8_ALPHABET = "GHITEBSC"
_TO_SS8 = {c: c for c in SS8_ALPHABET} | {" ": "C", "P": "C"}


class DsspError(RuntimeError):
    """mkdssp ran but its output cannot be used (e.g. it silently produced zero residues)."""


def chain_to_pdb_text(atoms: bs.AtomArray) -> str:
    """PDB text of one chain, residues renumbered 1..L on chain A, all records ATOM."""
    atoms = atoms.copy()
    starts = bs.get_residue_starts(atoms)
    counts = np.diff(np.append(starts, atoms.array_length()))
    atoms.res_id = np.repeat(np.arange(1, len(starts) + 1), counts)
    atoms.ins_code[:] = ""
    atoms.chain_id[:] = "A"
    atoms.hetero[:] = False  # modified residues (MSE ...) stay in DSSP's chain
    f = pdb.PDBFile()
    f.set_structure(atoms)
    out = io.StringIO()
    f.write(out)
    header = f"{'HEADER':<10}{'PROTEIN':<40}{'01-JAN-00':<9}   XXXX"
    return header + "\n" + out.getvalue()


def parse_dssp_classic(text: str) -> dict[int, str]:
    """Residue number -> raw DSSP code from classic DSSP output (column 17)."""
    lines = text.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.startswith("  #  RESIDUE")) + 1
    except StopIteration:
        return {}
    codes: dict[int, str] = {}
    for line in lines[start:]:
        if len(line) < 17 or line[13] == "!":  # '!' marks a chain break
            continue
        try:
            resnum = int(line[5:10])
        except ValueError:
            continue
        codes[resnum] = line[16]
    return codes


def to_ss8(code: str) -> str:
    """Map one DSSP code to the paper's alphabet (' ' and P -> C)."""
    try:
        return _TO_SS8[code]
    except KeyError as e:
        raise DsspError(f"unknown DSSP code {code!r}") from e


def ss8_from_codes(codes: dict[int, str], length: int) -> str:
    """SS8 string of `length` residues from DSSP codes keyed by 1-based position."""
    return "".join(to_ss8(codes.get(i, " ")) for i in range(1, length + 1))


def chain_ss8(atoms: bs.AtomArray, tool: Tool = MKDSSP, timeout: float = 300) -> str:
    """SS8 string, one letter of `GHITEBSC` per residue of `atoms` (one chain, heavy atoms).

    Raises ToolError when mkdssp is missing or fails, DsspError when it reports zero
    residues for a chain that has a complete backbone.
    """
    n_res = bs.get_residue_count(atoms)
    with tempfile.TemporaryDirectory(prefix="esm3-dssp-") as tmp:
        src = Path(tmp) / "chain.pdb"
        dst = Path(tmp) / "chain.dssp"
        src.write_text(chain_to_pdb_text(atoms))
        tool.run(["--output-format", "dssp", src, dst], timeout=timeout)
        text = dst.read_text() if dst.exists() else ""
    codes = parse_dssp_classic(text)
    if not codes:
        has_backbone = all(
            np.any(atoms.atom_name == name) for name in ("N", "CA", "C")
        )  # DSSP needs at least one complete residue
        if has_backbone:
            raise DsspError(f"mkdssp reported 0 of {n_res} residues (silent failure)")
    return ss8_from_codes(codes, n_res)


__all__ = ["SS8_ALPHABET", "DsspError", "ToolError", "chain_ss8", "parse_dssp_classic"]
