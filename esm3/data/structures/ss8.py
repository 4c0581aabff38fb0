"""8-class secondary structure (SS8) per residue with mkdssp 4, through `esm3.tool.MKDSSP`.

The chain is written as a PDB file with residues renumbered 1..L on chain A, so the DSSP
residue number is the residue's position; mkdssp 4 needs the HEADER line it gets here.
DSSP codes: H (alpha helix), B (bridge), E (strand), G (3-10 helix), I (pi helix),
T (turn), S (bend), ' ' (loop) and, since DSSP 4, P (polyproline II). The paper's
vocabulary is `GHITEBSC`: ' ' and P become C. Residues DSSP does not assign (incomplete
backbone, chain breaks) are C as well; their coordinates are NaN in the record, so a loader
can tell them apart.

`file_ss8` runs mkdssp once for all chains of a file (its cost is mostly the process and
its dictionary, not the residues). Each chain keeps its own residue numbering and gets its
own chain letter, and is moved by a whole number of Angstrom into a cell of its own, far
enough from the others that DSSP finds no hydrogen bond or bridge between chains: the
assignment equals that of mkdssp run on the chain alone.
"""

from __future__ import annotations

import io
import string
import tempfile
from collections.abc import Sequence
from pathlib import Path

import biotite.structure as bs
import biotite.structure.io.pdb as pdb
import numpy as np

from esm3.tool import MKDSSP, Tool, ToolError

SS8_ALPHABET = "GHITEBSC"
_TO_SS8 = {c: c for c in SS8_ALPHABET} | {" ": "C", "P": "C"}


class DsspError(RuntimeError):
    """mkdssp ran but its output cannot be used (e.g. it silently produced zero residues)."""


# one PDB chain letter per chain of a call (PDB chain ids are one character)
CHAIN_LETTERS = string.ascii_uppercase + string.ascii_lowercase + string.digits
# chains sit in cells of the cube [_BOX_LOW, _BOX_HIGH]^3 Angstrom: PDB's columns take no
# less than -999.999, and float32 coordinates below 2048 keep their third decimal exactly,
# so the written file equals the chain's own up to the shift
_BOX_LOW, _BOX_HIGH = -990.0, 2040.0
_GAP = 20.0  # Angstrom between cells; DSSP's hydrogen bonds need CA atoms within 9


def _renumbered(atoms: bs.AtomArray, chain_id: str, shift: np.ndarray | None) -> bs.AtomArray:
    """One chain, residues renumbered 1..L on `chain_id`, all records ATOM, moved by `shift`."""
    atoms = atoms.copy()
    starts = bs.get_residue_starts(atoms)
    counts = np.diff(np.append(starts, atoms.array_length()))
    atoms.res_id = np.repeat(np.arange(1, len(starts) + 1), counts)
    atoms.ins_code[:] = ""
    atoms.chain_id[:] = chain_id
    atoms.hetero[:] = False  # modified residues (MSE ...) stay in DSSP's chain
    if shift is not None:
        atoms.coord = atoms.coord + shift.astype(np.float32)
    return atoms


def _pdb_text(atoms: bs.AtomArray) -> str:
    f = pdb.PDBFile()
    f.set_structure(atoms)
    out = io.StringIO()
    f.write(out)
    header = f"{'HEADER':<10}{'PROTEIN':<40}{'01-JAN-00':<9}   XXXX"
    return header + "\n" + out.getvalue()


def chain_to_pdb_text(atoms: bs.AtomArray) -> str:
    """PDB text of one chain, residues renumbered 1..L on chain A, all records ATOM."""
    return _pdb_text(_renumbered(atoms, "A", None))


def parse_dssp_chains(text: str) -> dict[str, dict[int, str]]:
    """Chain letter -> residue number -> raw DSSP code, from classic DSSP output (chain in
    column 12, code in column 17)."""
    lines = text.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.startswith("  #  RESIDUE")) + 1
    except StopIteration:
        return {}
    codes: dict[str, dict[int, str]] = {}
    for line in lines[start:]:
        if len(line) < 17 or line[13] == "!":  # '!' marks a chain break
            continue
        try:
            resnum = int(line[5:10])
        except ValueError:
            continue
        codes.setdefault(line[11], {})[resnum] = line[16]
    return codes


def parse_dssp_classic(text: str) -> dict[int, str]:
    """Residue number -> raw DSSP code from classic DSSP output of one chain (column 17)."""
    return {r: c for chain in parse_dssp_chains(text).values() for r, c in chain.items()}


def to_ss8(code: str) -> str:
    """Map one DSSP code to the paper's alphabet (' ' and P -> C)."""
    try:
        return _TO_SS8[code]
    except KeyError as e:
        raise DsspError(f"unknown DSSP code {code!r}") from e


def ss8_from_codes(codes: dict[int, str], length: int) -> str:
    """SS8 string of `length` residues from DSSP codes keyed by 1-based position."""
    return "".join(to_ss8(codes.get(i, " ")) for i in range(1, length + 1))


def _run_mkdssp(pdb_text: str, tool: Tool, timeout: float) -> str:
    """Classic DSSP output of mkdssp on `pdb_text` (ToolError when it fails)."""
    with tempfile.TemporaryDirectory(prefix="esm3-dssp-") as tmp:
        src = Path(tmp) / "chains.pdb"
        dst = Path(tmp) / "chains.dssp"
        src.write_text(pdb_text)
        tool.run(["--output-format", "dssp", src, dst], timeout=timeout)
        return dst.read_text() if dst.exists() else ""


def _checked_ss8(atoms: bs.AtomArray, codes: dict[int, str]) -> str:
    n_res = bs.get_residue_count(atoms)
    if not codes:
        has_backbone = all(
            np.any(atoms.atom_name == name) for name in ("N", "CA", "C")
        )  # DSSP needs at least one complete residue
        if has_backbone:
            raise DsspError(f"mkdssp reported 0 of {n_res} residues (silent failure)")
    return ss8_from_codes(codes, n_res)


def chain_ss8(atoms: bs.AtomArray, tool: Tool = MKDSSP, timeout: float = 300) -> str:
    """SS8 string, one letter of `GHITEBSC` per residue of `atoms` (one chain, heavy atoms).

    Raises ToolError when mkdssp is missing or fails, DsspError when it reports zero
    residues for a chain that has a complete backbone.
    """
    text = _run_mkdssp(chain_to_pdb_text(atoms), tool, timeout)
    return _checked_ss8(atoms, parse_dssp_classic(text))


def _cell_shifts(chains: Sequence[bs.AtomArray]) -> list[np.ndarray] | None:
    """Whole-Angstrom shifts that put each chain in its own cell of the box, or None when
    they do not fit (then each chain is run alone)."""
    lows, highs = [], []
    for atoms in chains:
        xyz = atoms.coord[np.isfinite(atoms.coord).all(axis=1)].astype(np.float64)
        lows.append(xyz.min(axis=0) if len(xyz) else np.zeros(3))
        highs.append(xyz.max(axis=0) if len(xyz) else np.zeros(3))
    cell = max(float((h - lo).max()) for h, lo in zip(highs, lows, strict=True)) + _GAP
    per_axis = int((_BOX_HIGH - _BOX_LOW) // cell)
    if per_axis**3 < len(chains):
        return None
    shifts = []
    for k, low in enumerate(lows):
        ix, iy, iz = k % per_axis, k // per_axis % per_axis, k // per_axis**2
        origin = _BOX_LOW + cell * np.array([ix, iy, iz], dtype=np.float64)
        shifts.append(np.round(origin - low))
    return shifts


def file_ss8(
    chains: Sequence[bs.AtomArray], tool: Tool = MKDSSP, timeout: float = 300
) -> list[str | ToolError | DsspError]:
    """SS8 of every chain of one file, with one mkdssp call per group of at most
    len(CHAIN_LETTERS) chains; per chain its string or the error `chain_ss8` would raise.

    A chain the shared call cannot assign (the call fails, or reports none of its
    residues) is run alone, so its result or error is exactly its own.
    """
    out: list[str | ToolError | DsspError] = []
    step = len(CHAIN_LETTERS)
    for i in range(0, len(chains), step):
        out += _group_ss8(chains[i : i + step], tool, timeout)
    return out


def _group_ss8(chains: Sequence[bs.AtomArray], tool: Tool, timeout: float) -> list:
    shifts = _cell_shifts(chains) if len(chains) > 1 else [None] * len(chains)
    codes: dict[str, dict[int, str]] = {}
    if shifts is not None:
        letters = CHAIN_LETTERS[: len(chains)]
        moved = [_renumbered(a, c, s) for a, c, s in zip(chains, letters, shifts, strict=True)]
        try:
            text = _run_mkdssp(_pdb_text(bs.concatenate(moved)), tool, timeout * len(chains))
            codes = parse_dssp_chains(text)
        except ToolError as e:
            if len(chains) == 1:
                return [e]
    results: list = []
    for k, atoms in enumerate(chains):
        mine = codes.get(CHAIN_LETTERS[k])
        try:
            if mine or (len(chains) == 1 and shifts is not None):
                results.append(_checked_ss8(atoms, mine or {}))
            else:
                results.append(chain_ss8(atoms, tool, timeout))
        except (ToolError, DsspError) as e:
            results.append(e)
    return results


__all__ = [
    "SS8_ALPHABET",
    "DsspError",
    "ToolError",
    "chain_ss8",
    "file_ss8",
    "parse_dssp_classic",
]
