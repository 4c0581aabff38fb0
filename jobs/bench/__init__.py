"""Benchmarks for `make bench` / `esm3 bench`.

Each module `jobs/bench/bench_<suite>.py` defines `run(quick: bool = False) -> list[dict]`,
rows of the `benchmarks` table (suite, name, metric, value, unit, baseline, ratio, params).
Speed is reported as ratios against a baseline run side by side, never asserted in tests.
"""
