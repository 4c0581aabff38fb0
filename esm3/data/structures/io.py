"""Read PDB, mmCIF and BinaryCIF files (plain or gzipped) into per-chain arrays.

The reader keeps, per protein chain, the residues that appear in the coordinate records
(model 1, first alternate location, hydrogens dropped), in file order. Residues of the
SEQRES that were never resolved are not part of the chain; a resolved residue that lacks
one of N, CA, C gets NaN for the missing atoms.
"""

from __future__ import annotations

import gzip
import io
import re
from dataclasses import dataclass, field
from pathlib import Path

import biotite.structure as bs
import biotite.structure.io.pdb as pdb
import biotite.structure.io.pdbx as pdbx
import numpy as np

BACKBONE_ATOMS = ("N", "CA", "C")

# 3-letter -> 1-letter; common modified residues map to their parent, the rest is X
_ONE_LETTER = {
    "ALA": "A", "ARG": "R", "ASN": "N", "ASP": "D", "CYS": "C", "GLN": "Q", "GLU": "E",
    "GLY": "G", "HIS": "H", "ILE": "I", "LEU": "L", "LYS": "K", "MET": "M", "PHE": "F",
    "PRO": "P", "SER": "S", "THR": "T", "TRP": "W", "TYR": "Y", "VAL": "V",
    "SEC": "U", "PYL": "O", "MSE": "M", "SEP": "S", "TPO": "T", "PTR": "Y", "HYP": "P",
    "MLY": "K", "CSO": "C", "KCX": "K", "LLP": "K", "CME": "C", "MLE": "L", "ASX": "B",
    "GLX": "Z", "UNK": "X",
}  # fmt: skip


class StructureReadError(ValueError):
    """A structure file cannot be used; `reason` is short and groupable (rejects.reason)."""

    def __init__(self, source: str | Path, reason: str, detail: str) -> None:
        super().__init__(f"{source}: {reason}: {detail}")
        self.source = str(source)
        self.reason = reason
        self.detail = detail


@dataclass
class EntryMeta:
    """Entry-level metadata. `resolution` in Angstrom; `deposition_date` ISO yyyy-mm-dd."""

    entry_id: str
    format: str  # pdb | cif | bcif
    method: str | None = None  # experimental methods, upper case, ';'-joined
    resolution: float | None = None
    deposition_date: str | None = None
    entities: dict[str, str] = field(default_factory=dict)  # chain -> entity id
    # chain -> [(auth_begin, auth_end, db_begin, accession)], UniProt segments (SIFTS/DBREF)
    dbrefs: dict[str, list[tuple[int, int, int, str]]] = field(default_factory=dict)


@dataclass
class ParsedChain:
    """One protein chain. Shapes: L residues; `atoms` holds its heavy atoms.

    backbone: (L, 3, 3) float32 Angstrom, atoms N, CA, C; NaN where missing.
    bfactor: (L,) float32, the CA's B-factor (the residue's first atom when CA is absent).
    res_ids: (L,) int32 author residue numbers; uniprot_pos (L,) int32, -1 when unmapped.
    """

    chain_id: str
    entity: str
    sequence: str
    backbone: np.ndarray
    bfactor: np.ndarray
    res_ids: np.ndarray
    atoms: bs.AtomArray
    accession: str | None = None
    uniprot_pos: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.sequence)

    @property
    def complete_backbone(self) -> np.ndarray:
        """(L,) bool: N, CA and C all present."""
        return ~np.isnan(self.backbone).any(axis=(1, 2))


@dataclass
class Entry:
    meta: EntryMeta
    chains: list[ParsedChain]


def _open_bytes(path: Path) -> bytes:
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise StructureReadError(path, "unreadable", f"bad gzip data: {e}") from e
    return raw


def detect_format(path: Path, raw: bytes) -> str:
    """'pdb', 'cif' or 'bcif' from the suffix (ignoring .gz), else from the content."""
    suffixes = [s.lower() for s in path.suffixes if s.lower() != ".gz"]
    ext = suffixes[-1] if suffixes else ""
    if ext in (".cif", ".mmcif"):
        return "cif"
    if ext == ".bcif":
        return "bcif"
    if ext in (".pdb", ".ent"):
        return "pdb"
    head = raw[:2048].lstrip()
    if head.startswith(b"data_"):
        return "cif"
    if head[:1] and head[0] & 0xF0 in (0x80, 0xD0, 0xE0):  # msgpack map header
        return "bcif"
    return "pdb"


def read_structure(path: str | Path, entry_id: str | None = None) -> Entry:
    """Read one structure file into entry metadata and its protein chains.

    Raises StructureReadError (reason: empty, unreadable, no_protein_chain) for files that
    yield nothing usable.
    """
    path = Path(path)
    try:
        raw = _open_bytes(path)
    except OSError as e:
        raise StructureReadError(path, "unreadable", str(e)) from e
    if not raw.strip():
        raise StructureReadError(path, "empty", "file has no content")
    fmt = detect_format(path, raw)
    default_id = entry_id or file_stem(path)
    try:
        if fmt == "pdb":
            atoms, meta = _read_pdb(raw, default_id)
        else:
            atoms, meta = _read_pdbx(raw, fmt, default_id)
    except StructureReadError as e:
        raise StructureReadError(path, e.reason, e.detail) from e
    except Exception as e:  # biotite raises many types on malformed input
        raise StructureReadError(path, "unreadable", f"{type(e).__name__}: {e}") from e
    if entry_id:
        meta.entry_id = entry_id
    chains = chains_from_atoms(atoms, meta)
    if not chains:
        raise StructureReadError(path, "no_protein_chain", "no amino-acid residues in model 1")
    return Entry(meta, chains)


def file_stem(path: Path) -> str:
    """A file's entry id when its content names none: the name without its extensions."""
    name = path.name
    for ext in (".gz", ".cif", ".mmcif", ".bcif", ".pdb", ".ent"):
        if name.lower().endswith(ext):
            name = name[: -len(ext)]
    return name


# --- PDB format ---------------------------------------------------------------------------

_MONTHS = "JAN FEB MAR APR MAY JUN JUL AUG SEP OCT NOV DEC".split()


def _pdb_date(text: str) -> str | None:
    m = re.match(r"(\d{2})-([A-Z]{3})-(\d{2})", text.strip())
    if not m or m.group(2) not in _MONTHS:
        return None
    yy = int(m.group(3))
    year = 1900 + yy if yy >= 70 else 2000 + yy  # the PDB's two-digit years start in 1970s
    return f"{year:04d}-{_MONTHS.index(m.group(2)) + 1:02d}-{int(m.group(1)):02d}"


def _read_pdb(raw: bytes, entry_id: str) -> tuple[bs.AtomArray, EntryMeta]:
    text = raw.decode("utf-8", errors="replace")
    lines = text.splitlines()
    if not any(line.startswith(("ATOM", "HETATM")) for line in lines):
        raise StructureReadError(entry_id, "no_protein_chain", "no ATOM/HETATM records")
    meta = EntryMeta(entry_id=entry_id, format="pdb")
    methods: list[str] = []
    compnd = ""
    for line in lines:
        rec = line[:6]
        if rec == "HEADER":
            meta.deposition_date = _pdb_date(line[50:59])
            if line[62:66].strip() and entry_id == "":
                meta.entry_id = line[62:66].strip()
        elif rec == "EXPDTA":
            methods += [m.strip().upper() for m in line[10:].split(";") if m.strip()]
        elif rec == "REMARK" and line[7:10] == "  2" and "RESOLUTION." in line:
            m = re.search(r"RESOLUTION\.\s+([0-9.]+)", line)
            if m:
                meta.resolution = float(m.group(1))
        elif rec == "COMPND":
            compnd += line[10:80].rstrip() + " "
        elif rec == "DBREF ":
            db = line[26:32].strip()
            if db in ("UNP", "SWS", "TREMBL"):
                try:
                    seg = (
                        int(line[14:18]),
                        int(line[20:24]),
                        int(line[55:60]),
                        line[33:41].strip(),
                    )
                except ValueError:
                    continue
                meta.dbrefs.setdefault(line[12].strip(), []).append(seg)
    meta.method = ";".join(methods) or None
    mol = None
    for item in compnd.split(";"):
        key, _, value = item.partition(":")
        key = key.strip().upper()
        if key == "MOL_ID":
            mol = value.strip()
        elif key == "CHAIN" and mol:
            for ch in value.split(","):
                meta.entities[ch.strip()] = mol
    f = pdb.PDBFile.read(io.StringIO(text))
    atoms = f.get_structure(model=1, extra_fields=["b_factor"], altloc="first")
    return atoms, meta


# --- mmCIF / BinaryCIF -------------------------------------------------------------------


def _col(block, category: str, column: str) -> list[str]:
    cat = block.get(category)
    if cat is None or column not in cat:
        return []
    data = cat[column]
    mask = data.mask.array if data.mask is not None else None
    values = data.as_array(str)
    return [str(v) for i, v in enumerate(values) if mask is None or mask[i] == 0]


def _first_float(block, pairs: list[tuple[str, str]]) -> float | None:
    for category, column in pairs:
        vals = []
        for v in _col(block, category, column):
            try:
                vals.append(float(v))
            except ValueError:
                pass
        if vals:
            return min(vals)
    return None


def _read_pdbx(raw: bytes, fmt: str, entry_id: str) -> tuple[bs.AtomArray, EntryMeta]:
    if fmt == "bcif":
        f = pdbx.BinaryCIFFile.read(io.BytesIO(raw))
    else:
        f = pdbx.CIFFile.read(io.StringIO(raw.decode("utf-8", errors="replace")))
    block = f.block
    if block.get("atom_site") is None:
        raise StructureReadError(entry_id, "no_protein_chain", "no atom_site category")
    ids = _col(block, "entry", "id")
    meta = EntryMeta(entry_id=entry_id or (ids[0] if ids else ""), format=fmt)
    methods = [m.strip().upper() for m in _col(block, "exptl", "method") if m.strip()]
    meta.method = ";".join(methods) or None
    meta.resolution = _first_float(
        block,
        [
            ("refine", "ls_d_res_high"),
            ("reflns", "d_resolution_high"),
            ("em_3d_reconstruction", "resolution"),
        ],
    )
    dates = _col(block, "pdbx_database_status", "recvd_initial_deposition_date")
    meta.deposition_date = dates[0] if dates else None
    # UniProt references: struct_ref (entity -> accession), struct_ref_seq (segments)
    refs = {}
    ref_ids = _col(block, "struct_ref", "id")
    if ref_ids:
        dbs = _col(block, "struct_ref", "db_name")
        accs = _col(block, "struct_ref", "pdbx_db_accession")
        for rid, db, acc in zip(ref_ids, dbs, accs, strict=False):
            if db.upper() in ("UNP", "UNIPROT"):
                refs[str(rid)] = str(acc)
    seq_ref = _col(block, "struct_ref_seq", "ref_id")
    if seq_ref:
        strands = _col(block, "struct_ref_seq", "pdbx_strand_id")
        begs = _col(block, "struct_ref_seq", "pdbx_auth_seq_align_beg")
        ends = _col(block, "struct_ref_seq", "pdbx_auth_seq_align_end")
        dbegs = _col(block, "struct_ref_seq", "db_align_beg")
        for rid, ch, b, e, d in zip(seq_ref, strands, begs, ends, dbegs, strict=False):
            if rid in refs:
                try:
                    meta.dbrefs.setdefault(str(ch), []).append(
                        (int(b), int(e), int(d), str(refs[rid]))
                    )
                except ValueError:
                    continue
    extra = ["b_factor"]
    atom_site = block["atom_site"]
    if "label_entity_id" in atom_site:
        extra.append("label_entity_id")
    atoms = pdbx.get_structure(f, model=1, extra_fields=extra, altloc="first")
    if "label_entity_id" in extra:
        chain_ids, first = np.unique(atoms.chain_id, return_index=True)
        for ch, i in zip(chain_ids, first, strict=True):
            ent = str(atoms.label_entity_id[i])
            meta.entities[str(ch)] = ent if ent not in ("?", ".") else str(ch)
    return atoms, meta


# --- atoms -> chains ---------------------------------------------------------------------


def chains_from_atoms(atoms: bs.AtomArray, meta: EntryMeta) -> list[ParsedChain]:
    """Split model-1 atoms into protein chains (amino-acid residues, heavy atoms only)."""
    if atoms.array_length() == 0:
        return []
    keep = bs.filter_amino_acids(atoms) & ~np.isin(np.char.upper(atoms.element), ["H", "D"])
    atoms = atoms[keep]
    chains = []
    for chain_id in _ordered_unique(atoms.chain_id):
        chain = atoms[atoms.chain_id == chain_id]
        chains.append(_parse_chain(chain, str(chain_id), meta))
    return chains


def _ordered_unique(values: np.ndarray) -> list:
    _, idx = np.unique(values, return_index=True)
    return [values[i] for i in sorted(idx)]


def _parse_chain(chain: bs.AtomArray, chain_id: str, meta: EntryMeta) -> ParsedChain:
    starts = bs.get_residue_starts(chain)
    n = len(starts)
    res_index = np.repeat(np.arange(n), np.diff(np.append(starts, chain.array_length())))
    backbone = np.full((n, 3, 3), np.nan, dtype=np.float32)
    for slot, name in enumerate(BACKBONE_ATOMS):
        sel = np.flatnonzero(chain.atom_name == name)
        # first occurrence per residue wins (duplicate atoms are rare but exist)
        r, first = np.unique(res_index[sel], return_index=True)
        backbone[r, slot] = chain.coord[sel[first]]
    bfactor = chain.b_factor[starts].astype(np.float32)
    ca = np.flatnonzero(chain.atom_name == "CA")
    r, first = np.unique(res_index[ca], return_index=True)
    bfactor[r] = chain.b_factor[ca[first]]
    sequence = "".join(_ONE_LETTER.get(str(x), "X") for x in chain.res_name[starts])
    res_ids = chain.res_id[starts].astype(np.int32)
    accession, uniprot_pos = _map_uniprot(meta.dbrefs.get(chain_id, []), res_ids)
    return ParsedChain(
        chain_id=chain_id,
        entity=meta.entities.get(chain_id, chain_id),
        sequence=sequence,
        backbone=backbone,
        bfactor=bfactor,
        res_ids=res_ids,
        atoms=chain,
        accession=accession,
        uniprot_pos=uniprot_pos,
    )


def _map_uniprot(
    segments: list[tuple[int, int, int, str]], res_ids: np.ndarray
) -> tuple[str | None, np.ndarray | None]:
    """UniProt position of each residue from the first accession's reference segments."""
    if not segments:
        return None, None
    accession = segments[0][3]
    pos = np.full(len(res_ids), -1, dtype=np.int32)
    for beg, end, db_beg, acc in segments:
        if acc != accession:
            continue
        inside = (res_ids >= beg) & (res_ids <= end)
        pos[inside] = res_ids[inside] - beg + db_beg
    return accession, pos
