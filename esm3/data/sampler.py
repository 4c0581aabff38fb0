"""Two-level cluster sampling with per-dataset mixing weights (paper, A.2.1).

A draw picks a dataset by its mixing weight, then a low-level center uniformly within the
dataset, then a member uniformly within the center. Draws are a pure function of
(seed, step, rank): the random stream of a step is Philox with key (seed, rank) and a
counter that starts at `step << 128`, so a resumed run (or any rank on any node) draws the
same samples without replaying earlier steps. All work is vectorized numpy.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

STATE_VERSION = 1


@dataclass(frozen=True)
class ClusterIndex:
    """Members grouped by center, in CSR form.

    offsets: int64, shape (C + 1,): the members of center c are members[offsets[c]:offsets[c+1]];
    members: member ids, shape (M,); centers: center ids, shape (C,). A training store's index
    has offsets only (memory-mapped; its members are record rows, see esm3.data.store).
    """

    members: pa.Array | None
    centers: pa.Array | None
    offsets: np.ndarray

    @classmethod
    def from_table(cls, table: pa.Table) -> ClusterIndex:
        """Build from (center, member) rows (as `expand_clusters` returns: grouped by center;
        other tables are sorted by center first, stably)."""
        center = table.column("center").combine_chunks()
        member = table.column("member").combine_chunks()
        if len(center) == 0:
            raise ValueError("cluster table is empty: a dataset needs at least one center")
        change = pc.not_equal(center[1:], center[:-1]).to_numpy(zero_copy_only=False)
        starts = np.concatenate(([0], np.flatnonzero(change) + 1))
        if len(pc.unique(center)) != len(starts):  # not grouped: sort, then recount
            order = pc.sort_indices(center)
            return cls.from_table(
                pa.table({"center": center.take(order), "member": member.take(order)})
            )
        offsets = np.append(starts, len(center)).astype(np.int64)
        return cls(member, center.take(pa.array(starts)), offsets)

    @classmethod
    def from_parquet(cls, path: str | Path | list[str | Path]) -> ClusterIndex:
        paths = [path] if isinstance(path, str | Path) else path
        return cls.from_table(pa.concat_tables(pq.read_table(p) for p in paths))

    @property
    def sizes(self) -> np.ndarray:
        """Members per center, shape (C,)."""
        return np.diff(self.offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1


@dataclass(frozen=True)
class Samples:
    """One batch of draws, each array of shape (n,): dataset index (into `names`),
    center index and member row within that dataset's ClusterIndex."""

    dataset: np.ndarray
    center: np.ndarray
    member: np.ndarray
    names: tuple[str, ...]


class TwoLevelSampler:
    """Draw (dataset, center, member) samples; resumable through `state_dict()`.

    datasets: name -> ClusterIndex; weights: name -> mixing weight (normalized here; a
    dataset with weight 0 is never drawn). `sample(n)` draws the batch of the current step
    and advances the step; `sample_at(step, n)` draws any step without touching the state.
    """

    def __init__(
        self,
        datasets: dict[str, ClusterIndex],
        weights: dict[str, float],
        *,
        seed: int = 0,
        rank: int = 0,
        step: int = 0,
    ) -> None:
        if set(weights) - set(datasets):
            raise ValueError(
                f"weights for unknown datasets: {sorted(set(weights) - set(datasets))}"
            )
        self.names = tuple(datasets)
        w = np.array([float(weights.get(n, 0.0)) for n in self.names])
        if (w < 0).any() or not np.isfinite(w).all() or w.sum() <= 0:
            raise ValueError(f"mixing weights must be finite, >= 0 and not all 0: {weights}")
        self.weights = w / w.sum()
        self._cum = np.cumsum(self.weights)
        self._cum[-1] = 1.0
        self.indexes = [datasets[n] for n in self.names]
        # each dataset's offsets are used where they are (memory-mapped in a training store):
        # nothing here grows with the number of centers
        self._ncent = np.array([len(ix) for ix in self.indexes], dtype=np.int64)
        self.seed, self.rank, self.step = int(seed), int(rank), int(step)

    def _rng(self, step: int, chunk: int = 0) -> np.random.Generator:
        key = (self.seed & (2**64 - 1)) | ((self.rank & (2**64 - 1)) << 64)
        counter = (int(step) << 128) | ((int(chunk) & (2**64 - 1)) << 64)
        return np.random.Generator(np.random.Philox(key=key, counter=counter))

    def sample_at(self, step: int, n: int) -> Samples:
        """The n draws of `step` for this (seed, rank); vectorized, O(n). The draws depend
        on n (the stream is split in three), so a prefix of them is not stable in n."""
        return self._draw(self._rng(step).random((3, n)))

    def sample_chunk(self, step: int, chunk: int, n: int) -> Samples:
        """Chunk `chunk` of n draws of `step`: a stream of fixed-size chunks whose prefix does
        not depend on how many chunks are read (token-counted batches). Chunk c starts the
        Philox counter at (step << 128) | (c << 64), so chunks never overlap (a chunk would
        need 2**64 blocks to reach the next); chunk 0 is `sample_at(step, n)`."""
        return self._draw(self._rng(step, chunk).random((3, n)))

    def _draw(self, u: np.ndarray) -> Samples:
        """Samples from uniforms u (3, n): dataset, center, member."""
        ds = np.searchsorted(self._cum, u[0], side="right")
        np.minimum(ds, len(self.names) - 1, out=ds)
        ncent = self._ncent[ds]
        center = np.minimum((u[1] * ncent).astype(np.int64), ncent - 1)
        member = np.zeros(u.shape[1], dtype=np.int64)
        for d, ix in enumerate(self.indexes):
            sel = np.flatnonzero(ds == d)
            if len(sel):
                start = np.asarray(ix.offsets[center[sel]], dtype=np.int64)
                size = np.asarray(ix.offsets[center[sel] + 1], dtype=np.int64) - start
                member[sel] = start + np.minimum((u[2][sel] * size).astype(np.int64), size - 1)
        return Samples(ds, center, member, self.names)

    def sample(self, n: int) -> Samples:
        """The draws of the current step; then advance the step."""
        out = self.sample_at(self.step, n)
        self.step += 1
        return out

    def member_ids(self, samples: Samples) -> list[str]:
        """Member ids of a batch, in draw order."""
        out = np.empty(len(samples.member), dtype=object)
        for d, ix in enumerate(self.indexes):
            sel = np.flatnonzero(samples.dataset == d)
            if len(sel):
                out[sel] = ix.members.take(pa.array(samples.member[sel])).to_numpy(
                    zero_copy_only=False
                )
        return out.tolist()

    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "seed": self.seed,
            "rank": self.rank,
            "step": self.step,
            "datasets": list(self.names),
            "weights": self.weights.tolist(),
            "centers": self._ncent.tolist(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume: the same datasets, weights and cluster counts are required."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"sampler state version {state.get('version')} != {STATE_VERSION}")
        mine = self.state_dict()
        for key in ("datasets", "centers"):
            if list(state[key]) != mine[key]:
                raise ValueError(f"sampler state {key} {state[key]} != current {mine[key]}")
        if not np.allclose(state["weights"], mine["weights"]):
            raise ValueError(f"sampler state weights {state['weights']} != {mine['weights']}")
        self.seed, self.rank, self.step = int(state["seed"]), int(state["rank"]), int(state["step"])
