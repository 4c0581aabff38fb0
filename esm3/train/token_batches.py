"""Token-counted batches: one rank's rows of the stage's context length, filled by packing.

A step holds `data.batch_tokens` positions over all ranks; a rank fills its share as rows of
the stage's context length. Samples come from a prefix-stable stream of draws
(`draw_stream`: fixed-size chunks of the sampler, so draw k of a data index never depends on
how many draws are read), each corrupted and cropped to the context length by the recipe,
and are placed first-fit in arrival order (`fill_rows`) until the rows are at least
FILL_TARGET full and the next sample no longer fits. Packed samples keep their own
`sequence_id`, so attention stays within each one (block-diagonal).

So a rank's batch is a pure function of (seed, rank, step, data index), like the
sample-counted batches: resume and rollback stay exact.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from esm3.data.sampler import TwoLevelSampler

#: Draws per sampler chunk. Part of the stream's definition: changing it changes every batch.
CHUNK = 64
#: A step's rows are filled to at least this fraction (when the data allows).
FILL_TARGET = 0.9
#: The draw cap still fills the rows when samples average this few positions.
MIN_MEAN_LENGTH = 8


def max_draws(rows: int, width: int) -> int:
    """Draws one rank may read for a step: bounds the work when the data cannot fill the
    rows (tiny samples, many refused records); at least 64 per row."""
    return rows * max(64, -(-width // MIN_MEAN_LENGTH))


def draw_stream(sampler: TwoLevelSampler, data_step: int) -> Iterator[tuple[int, int]]:
    """(dataset index, member) of draws 0, 1, 2, ... of a data index, for the sampler's
    (seed, rank); endless, read lazily chunk by chunk."""
    for chunk in itertools.count():
        s = sampler.sample_chunk(data_step, chunk, CHUNK)
        yield from zip(s.dataset.tolist(), s.member.tolist(), strict=True)


@dataclass
class Rows:
    """Rows of `width` positions being filled: members[r] lists the samples (indices in
    arrival order) of row r, free[r] its positions still empty."""

    width: int
    members: list[list[int]]
    free: list[int]

    @classmethod
    def empty(cls, rows: int, width: int) -> Rows:
        return cls(width, [[] for _ in range(rows)], [width] * rows)

    @property
    def used(self) -> int:
        return self.width * len(self.free) - sum(self.free)

    @property
    def capacity(self) -> int:
        return self.width * len(self.free)

    def place(self, sample: int, length: int) -> bool:
        """Put the sample in the first row with room for it; False when none has."""
        for r, f in enumerate(self.free):
            if length <= f:
                self.members[r].append(sample)
                self.free[r] -= length
                return True
        return False


def fill_rows(
    lengths: Iterable[int], rows: int, width: int, target: float = FILL_TARGET
) -> list[list[int]]:
    """Pack samples of the given lengths (read lazily, in order) first-fit into `rows` rows
    of `width` positions; returns each row's samples as indices into the read order.

    Reading stops when the rows are full, or once they are at least `target` full and a
    sample does not fit, or when `lengths` ends (then they may fall short of the target).
    A sample that finds no room before the target is reached is
    left out: a slight tilt towards short samples at the end of a step, the price of whole
    samples in rows of fixed length.
    """
    packed = Rows.empty(rows, width)
    for i, n in enumerate(lengths):
        if packed.place(i, n):
            if packed.used == packed.capacity:
                break
        elif packed.used >= target * packed.capacity:
            break
    return packed.members
