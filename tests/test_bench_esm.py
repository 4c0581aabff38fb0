"""The esm comparison benchmark's rows at a tiny shape: names, units, positive values and
parameter counts. No timings are asserted (speed belongs to `make bench`)."""

from __future__ import annotations

import math

import pytest

from jobs.bench import bench_esm

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

TINY = bench_esm.Shape(d_model=64, n_layers=2, n_heads=2, geom_heads=4)
METRICS = {
    "tokens_per_s": "tokens/s",
    "gflops_per_s": "GFLOP/s",
    "matmul_fraction": "fraction",
    "params": "params",
}


@pytest.fixture(scope="module")
def rows():
    return bench_esm.measure((TINY,), batch=1, length=16, reps=1, matmul_n=128)


def test_rows_structure(rows):
    assert rows[0]["name"] == "matmul/fp32_128" and rows[0]["unit"] == "GFLOP/s"
    by = {(r["name"], r["metric"]): r for r in rows[1:]}
    expected = {(f"{TINY.name}/{who}", m) for who in ("esm", "suite") for m in METRICS}
    assert set(by) == expected and len(rows) == 1 + len(expected)
    for r in rows:
        assert r["suite"] == "esm"
        assert math.isfinite(r["value"]) and r["value"] > 0, r
    for (name, metric), r in by.items():
        assert r["unit"] == METRICS[metric]
        assert r["params"]["length"] == 18 and r["params"]["d_model"] == 64  # bos + 16 + eos
        if name.endswith("/suite") and metric != "matmul_fraction":
            esm = by[(f"{TINY.name}/esm", metric)]["value"]
            assert r["baseline"] == esm and r["ratio"] == pytest.approx(r["value"] / esm)
        else:
            assert r["baseline"] is None and r["ratio"] is None
    # GFLOP/s follow tokens/s through the same FLOPs per token, and the matmul rate
    for who in ("esm", "suite"):
        r = {m: by[(f"{TINY.name}/{who}", m)] for m in METRICS}
        fpt = r["params"]["params"]["flops_per_token"]
        assert r["gflops_per_s"]["value"] == pytest.approx(r["tokens_per_s"]["value"] * fpt / 1e9)
        assert r["matmul_fraction"]["value"] == pytest.approx(
            r["gflops_per_s"]["value"] / rows[0]["value"]
        )


def test_parameter_rows_count_the_models(rows):
    p = rows[1]["params"]
    for who in ("suite", "esm"):
        parts = p[f"params_{who}"]
        assert parts["total"] == parts["embeddings"] + parts["trunk"] + parts["heads"]
        assert rows_value(rows, f"{TINY.name}/{who}", "params") == parts["total"]
    assert p["params_difference"]["total"] == p["params_suite"]["total"] - p["params_esm"]["total"]


def test_parameter_counts_equal(rows):
    suite = rows_value(rows, f"{TINY.name}/suite", "params")
    esm = rows_value(rows, f"{TINY.name}/esm", "params")
    assert suite == esm, f"suite - esm = {suite - esm:+,} parameters"


def rows_value(rows, name, metric):
    return next(r["value"] for r in rows if r["name"] == name and r["metric"] == metric)
