"""Position masks: i.i.d. and contiguous spans."""

from __future__ import annotations

import numpy as np


def iid_mask(n: int, rate: float, rng: np.random.Generator) -> np.ndarray:
    """Each of n positions masked independently with probability `rate`; (n,) bool."""
    return rng.random(n) < rate


def span_mask(n: int, rate: float, rng: np.random.Generator, max_spans: int = 8) -> np.ndarray:
    """round(rate * n) positions masked as 1..max_spans contiguous spans; (n,) bool.

    The span count is uniform in [1, max_spans] (capped by what fits); the masked total is
    split into spans and the rest into the gaps around them uniformly at random
    (multinomial), with gaps between spans at least one position long.
    """
    m = int(round(rate * n))
    if m <= 0:
        return np.zeros(n, dtype=bool)
    if m >= n:
        return np.ones(n, dtype=bool)
    k = min(int(rng.integers(1, max_spans + 1)), m, n - m + 1)
    even_k = np.full(k, 1.0 / k)
    spans = 1 + rng.multinomial(m - k, even_k)
    gaps = rng.multinomial(n - m - (k - 1), np.full(k + 1, 1.0 / (k + 1)))
    gaps[1:-1] += 1
    lengths = np.empty(2 * k + 1, dtype=np.int64)
    lengths[0::2] = gaps
    lengths[1::2] = spans
    values = np.zeros(2 * k + 1, dtype=bool)
    values[1::2] = True
    return np.repeat(values, lengths)
