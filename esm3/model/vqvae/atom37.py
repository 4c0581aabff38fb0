"""The atom37 layout: one fixed slot per heavy-atom name, whatever the residue type.

The order is AlphaFold's, which `esm` also uses, so atom37 arrays cross between the two
unchanged. N, CA and C are slots 0, 1 and 2: `coords[..., :3, :]` is the backbone.
"""

from __future__ import annotations

ATOM37: tuple[str, ...] = (
    "N", "CA", "C", "CB", "O", "CG", "CG1", "CG2", "OG", "OG1", "SG", "CD", "CD1", "CD2",
    "ND1", "ND2", "OD1", "OD2", "SD", "CE", "CE1", "CE2", "CE3", "NE", "NE1", "NE2", "OE1",
    "OE2", "CH2", "NH1", "NH2", "OH", "CZ", "CZ2", "CZ3", "NZ", "OXT",
)  # fmt: skip
N_ATOM37 = len(ATOM37)
ATOM37_INDEX: dict[str, int] = {name: i for i, name in enumerate(ATOM37)}
BACKBONE = ("N", "CA", "C")
