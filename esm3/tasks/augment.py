"""Structure-aware sample augmentations of the paper (A.2.2), as index computations.

All functions work on residue indices (0-based) and return segments: a list of half-open
[start, end) residue ranges that become the sample's chains, joined by chainbreak tokens.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree


def ca_contacts(
    ca: np.ndarray,
    present: np.ndarray,
    cutoff: float,
    min_sep: int,
    index: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (i, j), i < j, with CA-CA distance < cutoff (Angstrom) and index gap >= min_sep.

    `ca` (N, 3) Angstrom; `present` (N,) bool; `index` (N,) residue numbers used for the
    sequence separation (default 0..N-1). Returns two int arrays of positions into `ca`.
    """
    pos = np.flatnonzero(present)
    if pos.size < 2:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    # a k-d tree finds the few close pairs without an O(N^2) distance matrix
    pairs = cKDTree(ca[pos]).query_pairs(cutoff * (1 - 1e-7), output_type="ndarray")
    if pairs.size == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    pairs.sort(axis=1)
    a, b = pairs[:, 0], pairs[:, 1]
    num = pos if index is None else index[pos]
    keep = np.abs(num[b] - num[a]) >= min_sep
    a, b = a[keep], b[keep]
    return pos[a], pos[b]


def coordination_residues(
    ca: np.ndarray,
    present: np.ndarray,
    index: np.ndarray,
    rng: np.random.Generator,
    *,
    contact: float = 6.0,
    min_sep: int = 10,
    neighbor_prob: float = 0.5,
) -> tuple[np.ndarray, np.ndarray] | None:
    """Atomic coordination sampling: a random triplet mutually in contact, plus neighbours.

    Three positions whose CA atoms are pairwise closer than `contact` Angstrom and pairwise
    at least `min_sep` apart in `index`; each one's sequence neighbours (index +-1, when in
    the sample with coordinates) are added independently with `neighbor_prob`.
    Returns (triplet (3,), shown positions (3..9,)) or None when no triplet exists.
    """
    a, b = ca_contacts(ca, present, contact, min_sep, index)
    if a.size == 0:
        return None
    # adjacency over the residues that take part in a contact only (few)
    nodes, inv = np.unique(np.concatenate([a, b]), return_inverse=True)
    ia, ib = inv[: a.size], inv[a.size :]
    adj = np.zeros((nodes.size, nodes.size), dtype=bool)
    adj[ia, ib] = adj[ib, ia] = True
    # a third residue in contact with both ends of an edge (and far from both in sequence);
    # edges are tried in random order, a chunk at a time: the first edge with a third
    # residue is then uniform over all such edges, without testing every edge
    order = rng.permutation(a.size)
    for lo in range(0, order.size, 64):
        chunk = order[lo : lo + 64]
        common = adj[ia[chunk]] & adj[ib[chunk]]
        has = np.flatnonzero(common.any(axis=1))
        if has.size:
            h = has[rng.integers(has.size)]
            cs = np.flatnonzero(common[h])
            e = chunk[h]
            triplet = np.array([a[e], b[e], nodes[cs[rng.integers(cs.size)]]])
            break
    else:
        return None
    # neighbours: positions with coordinates whose residue number is one off a member
    with_xyz = np.flatnonzero(present)
    nums = index[with_xyz]  # increasing along the sample
    wanted = (index[triplet][:, None] + np.array([-1, 1])).ravel()
    wanted = wanted[rng.random(wanted.size) < neighbor_prob]
    k = np.searchsorted(nums, wanted).clip(max=nums.size - 1)
    found = with_xyz[k[nums[k] == wanted]]
    shown = np.concatenate([triplet, found])
    return triplet, np.unique(shown)


def interface_segments(
    ca: np.ndarray,
    present: np.ndarray,
    rng: np.random.Generator,
    *,
    contact: float = 8.0,
    min_sep: int = 24,
) -> tuple[list[tuple[int, int]], tuple[int, int]] | None:
    """Tertiary interface sampling: two pseudo-chains around a random long-range contact.

    With the contact at 1-based residues i < j of a length-L chain, chain 1 is
    [RANDINT(1, i-3), RANDINT(i+3, j-15)] and chain 2 [RANDINT(i+15, j-3), RANDINT(j+15, L)]
    (the paper's bounds, inclusive). So that a gap always separates them, chain 2's start is
    drawn from [max(i+15, end1+2), j-3], still inside the paper's range. Contacts whose bounds
    do not fit (i < 4 or j > L-15) are not candidates.
    Returns (segments as 0-based half-open ranges, (i, j) 1-based) or None.
    """
    L = ca.shape[0]
    a, b = ca_contacts(ca, present, contact, min_sep)
    i1, j1 = a + 1, b + 1
    ok = (i1 >= 4) & (j1 + 15 <= L)
    if not ok.any():
        return None
    k = rng.choice(np.flatnonzero(ok))
    i, j = int(i1[k]), int(j1[k])

    def randint(lo: int, hi: int) -> int:
        return int(rng.integers(lo, hi + 1))

    s1, e1 = randint(1, i - 3), randint(i + 3, j - 15)
    s2, e2 = randint(max(i + 15, e1 + 2), j - 3), randint(j + 15, L)
    return [(s1 - 1, e1), (s2 - 1, e2)], (i, j)


def gap_segments(
    length: int,
    rng: np.random.Generator,
    *,
    p: float = 0.9,
    max_chains: int = 9,
    min_gap: int = 10,
    alpha: float = 1.0,
) -> list[tuple[int, int]]:
    """Residue gap augmentation: split residues [0, length) into pseudo-chains.

    The chain count is Geometric(p) (1 with probability p), capped at `max_chains` and at
    what fits (each chain >= 1 residue, each gap >= `min_gap` residues). The residues left
    over after the minimums are shared among the n chains and n-1 gaps by proportions drawn
    from a symmetric Dirichlet(alpha), so each chain's length is identically distributed.
    Gap residues are dropped. Returns 0-based half-open ranges.
    """
    n = min(int(rng.geometric(p)), max_chains, (length + min_gap) // (1 + min_gap))
    if n <= 1:
        return [(0, length)]
    free = length - n - (n - 1) * min_gap
    parts = rng.multinomial(free, rng.dirichlet(np.full(2 * n - 1, alpha)))
    parts[0::2] += 1  # chains
    parts[1::2] += min_gap  # gaps
    ends = np.cumsum(parts)
    starts = ends - parts
    return [(int(starts[c]), int(ends[c])) for c in range(0, 2 * n - 1, 2)]
