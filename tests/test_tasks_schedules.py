"""Mask-rate schedules against their closed forms (Kolmogorov-Smirnov, fixed seeds)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from esm3.tasks.schedules import SCHEDULES, cdf, rate_from_uniform, sample_mask_rate


@pytest.mark.parametrize("name", SCHEDULES)
def test_schedule_matches_closed_form(name):
    x = sample_mask_rate(name, np.random.default_rng(123), 20000)
    assert x.min() >= 0 and x.max() <= 1
    assert stats.kstest(x, lambda r: cdf(name, r)).pvalue > 0.01


@pytest.mark.parametrize("name", SCHEDULES)
def test_scalar_draws_match_closed_form(name):
    rng = np.random.default_rng(7)
    x = np.array([rate_from_uniform(name, rng.random(), rng) for _ in range(5000)])
    assert stats.kstest(x, lambda r: cdf(name, r)).pvalue > 0.01


def test_ks_detects_a_wrong_schedule():
    x = sample_mask_rate("cosine", np.random.default_rng(0), 20000)
    assert stats.kstest(x, lambda r: cdf("cubic", r)).pvalue < 1e-6


def test_betalinear30_mean_is_030():
    x = sample_mask_rate("betalinear30", np.random.default_rng(1), 400000)
    assert x.mean() == pytest.approx(0.30, abs=0.002)
    # closed form of the mixture mean: 0.8 * 3/12 + 0.2 * 1/2
    assert 0.8 * 3 / 12 + 0.2 * 0.5 == pytest.approx(0.30)


def test_closed_form_means():
    grid = np.linspace(0, 1, 200001)
    for name, mean in (("cosine", 2 / np.pi), ("cubic", 0.75), ("square_root", 1 / 3)):
        # E[R] = integral of (1 - F(r)) dr
        assert np.trapezoid(1 - cdf(name, grid), grid) == pytest.approx(mean, abs=1e-4)


def test_unknown_schedule():
    with pytest.raises(ValueError, match="unknown noise schedule 'linear'"):
        sample_mask_rate("linear", np.random.default_rng(0), 3)
