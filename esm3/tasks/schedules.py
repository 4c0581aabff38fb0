"""Mask-rate schedules of the paper's Table S6, each a distribution over [0, 1].

betalinear30: 80% Beta(3, 9) (mean 0.25) + 20% Uniform(0, 1): mean 0.8*0.25 + 0.2*0.5 = 0.30.
The others follow MaskGIT: t ~ U(0, 1) and rate = cos(pi t / 2) (cosine), 1 - t^3 (cubic),
1 - sqrt(t) (square root). `cdf` gives each closed form (used by the KS tests).
"""

from __future__ import annotations

import numpy as np
from scipy import stats

SCHEDULES = ("betalinear30", "cosine", "cubic", "square_root", "uniform")


def sample_mask_rate(
    name: str, rng: np.random.Generator, size: int | None = None, *, beta_fraction: float = 0.8
) -> np.ndarray | float:
    """Draw mask rates in [0, 1] from the named schedule (a float when size is None)."""
    t = rng.random(size)
    if name == "betalinear30":
        beta = rng.beta(3.0, 9.0, size)
        out = np.where(rng.random(size) < beta_fraction, beta, t)
        return float(out) if size is None else out
    if name == "cosine":
        return np.cos(np.pi * t / 2)
    if name == "cubic":
        return 1.0 - t**3
    if name == "square_root":
        return 1.0 - np.sqrt(t)
    if name == "uniform":
        return t
    raise ValueError(f"unknown noise schedule {name!r}; known: {', '.join(SCHEDULES)}")


def rate_from_uniform(
    name: str, u: float, rng: np.random.Generator, *, beta_fraction: float = 0.8
) -> float:
    """One mask rate from a uniform draw `u` (the t of MaskGIT); betalinear30 uses `u` to
    choose its component and draws the Beta(3, 9) / uniform value from `rng`."""
    if name == "betalinear30":
        return float(rng.beta(3.0, 9.0)) if u < beta_fraction else float(rng.random())
    if name == "cosine":
        return float(np.cos(np.pi * u / 2))
    if name == "cubic":
        return 1.0 - u**3
    if name == "square_root":
        return 1.0 - u**0.5
    if name == "uniform":
        return u
    raise ValueError(f"unknown noise schedule {name!r}; known: {', '.join(SCHEDULES)}")


def cdf(name: str, r: np.ndarray, *, beta_fraction: float = 0.8) -> np.ndarray:
    """Closed-form cumulative distribution P(rate <= r) of a schedule, r in [0, 1]."""
    r = np.clip(np.asarray(r, dtype=np.float64), 0.0, 1.0)
    if name == "betalinear30":
        return beta_fraction * stats.beta.cdf(r, 3, 9) + (1 - beta_fraction) * r
    if name == "cosine":
        return 1.0 - 2.0 / np.pi * np.arccos(r)
    if name == "cubic":
        return 1.0 - np.cbrt(1.0 - r)
    if name == "square_root":
        return 1.0 - (1.0 - r) ** 2
    if name == "uniform":
        return r
    raise ValueError(f"unknown noise schedule {name!r}; known: {', '.join(SCHEDULES)}")
