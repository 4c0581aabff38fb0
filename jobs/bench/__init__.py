"""Benchmarks for `make bench` / `esm3 bench`.

Each module `jobs/bench/bench_<suite>.py` defines `run(quick: bool = False) -> list[dict]`,
rows of the `benchmarks` table (suite, name, metric, value, unit, baseline, ratio, params).
Speed is reported as ratios against a baseline run side by side, never asserted in tests.
"""

from typing import Any


def bench_row(
    suite: str,
    name: str,
    metric: str,
    value: float,
    unit: str,
    *,
    baseline: float | None = None,
    ratio: float | None = None,
    params: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One `benchmarks` row; `ratio` defaults to value / baseline when a baseline is given."""
    if ratio is None and baseline:
        ratio = float(value) / float(baseline)
    return {
        "suite": suite,
        "name": name,
        "metric": metric,
        "value": float(value),
        "unit": unit,
        "baseline": None if baseline is None else float(baseline),
        "ratio": None if ratio is None else float(ratio),
        "params": params or {},
    }
