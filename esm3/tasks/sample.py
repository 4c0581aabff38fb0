"""The training sample: one protein with per-residue arrays for every track."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

Annotation = tuple[str, int, int]  # (label id, start, end): 1-based inclusive


@dataclass
class Protein:
    """One protein (possibly several chains) with its per-residue tracks.

    Attributes (L = len(sequence)):
      sequence: one-letter codes (upper case).
      coords: (L, 3, 3) float32, N/CA/C in Angstrom, NaN where missing; None: no structure.
      plddt: (L,) float32 in [0, 1] (or None).
      sasa: (L,) float32 Angstrom^2, NaN where missing (or None).
      ss8: DSSP string of length L over `GHITEBSC` (or None).
      structure_tokens: (L,) int64 codebook indices, -1 where no coordinates (or None).
      function: InterPro annotations as (interpro_id, start, end), 1-based inclusive.
      residue_annotations: per-residue labels as (label, start, end), 1-based inclusive.
      chain_ids: (L,) int64 chain index per residue (zeros for a single chain).
      id, dataset: provenance.
    """

    sequence: str
    coords: np.ndarray | None = None
    plddt: np.ndarray | None = None
    sasa: np.ndarray | None = None
    ss8: str | None = None
    structure_tokens: np.ndarray | None = None
    function: list[Annotation] = field(default_factory=list)
    residue_annotations: list[Annotation] = field(default_factory=list)
    chain_ids: np.ndarray | None = None
    id: str = ""
    dataset: str = ""

    def __post_init__(self) -> None:
        L = len(self.sequence)
        where = f"protein {self.id!r}" if self.id else "protein"
        if L == 0:
            raise ValueError(f"{where}: empty sequence")

        def check(name: str, arr: Any, shape: tuple[int, ...], dtype: type) -> Any:
            if arr is None:
                return None
            arr = np.asarray(arr, dtype=dtype)
            if arr.shape != shape:
                raise ValueError(f"{where}: {name} has shape {arr.shape}, expected {shape}")
            return arr

        self.coords = check("coords", self.coords, (L, 3, 3), np.float32)
        self.plddt = check("plddt", self.plddt, (L,), np.float32)
        self.sasa = check("sasa", self.sasa, (L,), np.float32)
        self.structure_tokens = check("structure_tokens", self.structure_tokens, (L,), np.int64)
        self.chain_ids = check("chain_ids", self.chain_ids, (L,), np.int64)
        if self.chain_ids is None:
            self.chain_ids = np.zeros(L, dtype=np.int64)
        if self.ss8 is not None and len(self.ss8) != L:
            raise ValueError(f"{where}: ss8 has length {len(self.ss8)}, expected {L}")

    def __len__(self) -> int:
        return len(self.sequence)

    @property
    def has_structure(self) -> bool:
        """True when at least one residue has all backbone atoms."""
        return self.coords is not None and bool(np.isfinite(self.coords).all(axis=(1, 2)).any())

    @classmethod
    def from_record(cls, row: dict[str, Any]) -> Protein:
        """A Protein from a Parquet row of the structure or the sequence shards.

        Structure layout: id, dataset, sequence, coords (flat L*9 float32 or null), plddt,
        sasa (lists or null), ss8 (str or null), structure_tokens (list or null),
        annotations (list of {ipr, start, end} or null). Sequence layout: id, dataset,
        sequence, length, ... (no structure columns). Raises ValueError naming the record
        and the column on a missing sequence or wrong lengths.
        """
        rid = str(row.get("id", ""))
        seq = row.get("sequence")
        if not isinstance(seq, str) or not seq:
            raise ValueError(f"record {rid!r}: column 'sequence' missing or empty")
        L = len(seq)
        if row.get("length") is not None and int(row["length"]) != L:
            raise ValueError(f"record {rid!r}: column 'length' {row['length']} != {L} residues")

        def arr(name: str, n: int, dtype: type) -> np.ndarray | None:
            v = row.get(name)
            if v is None:
                return None
            a = np.asarray(v, dtype=dtype)
            if a.size != n:
                raise ValueError(
                    f"record {rid!r}: column {name!r} has {a.size} values, expected {n}"
                )
            return a

        coords = arr("coords", L * 9, np.float32)
        annotations = row.get("annotations")
        function = (
            [(str(a["ipr"]), int(a["start"]), int(a["end"])) for a in annotations]
            if annotations is not None
            else []
        )
        residue = row.get("residue_annotations")
        residue_annotations = (
            [(str(a["label"]), int(a["start"]), int(a["end"])) for a in residue]
            if residue is not None
            else []
        )
        return cls(
            sequence=seq,
            coords=None if coords is None else coords.reshape(L, 3, 3),
            plddt=arr("plddt", L, np.float32),
            sasa=arr("sasa", L, np.float32),
            ss8=row.get("ss8"),
            structure_tokens=arr("structure_tokens", L, np.int64),
            function=function,
            residue_annotations=residue_annotations,
            id=rid,
            dataset=str(row.get("dataset") or ""),
        )
