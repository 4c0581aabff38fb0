"""The dashboard's pure helpers: EMA smoothing of downsampled curves, rolling fractions,
the streamlit command line that `serve` runs, and how the workspace is found."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dashboard import charts, common, serve


def test_ema_closed_forms():
    x = np.array([2.0, 4.0, 8.0])
    assert charts.ema(x, 0.0) == pytest.approx(x)  # no smoothing: the values themselves
    assert charts.ema(np.full(50, 3.5), 0.99) == pytest.approx(np.full(50, 3.5))  # debiased
    s = 0.5  # by hand: acc = s*acc + (1-s)*x, norm likewise
    acc1, n1 = 0.5 * 2, 0.5
    acc2, n2 = s * acc1 + 0.5 * 4, s * n1 + 0.5
    assert charts.ema(x, s)[:2] == pytest.approx([acc1 / n1, acc2 / n2])


def test_ema_of_buckets_equals_ema_of_steps():
    """A bucket of w equal steps decays the weight w times: smoothing means the same at any
    downsampling, exactly so when values are constant within each bucket."""
    rng = np.random.default_rng(0)
    means = rng.normal(3, 1, 40)
    width = 25
    per_step = np.repeat(means, width)
    s = 0.98
    fine = charts.ema(per_step, s)
    coarse = charts.ema(means, s, width)
    assert coarse == pytest.approx(fine[width - 1 :: width], rel=1e-12)


def test_ema_skips_non_finite_and_checks_range():
    out = charts.ema([1.0, np.nan, np.inf, 1.0], 0.9)
    assert np.all(np.isfinite(out)) and out == pytest.approx(1.0)
    assert np.isnan(charts.ema([np.nan, 2.0], 0.5)[0])
    with pytest.raises(ValueError, match="smoothing must be in"):
        charts.ema([1.0], 1.0)


def test_rolling_fraction_is_weighted_by_rows():
    df = pd.DataFrame(
        {
            "run_id": ["a"] * 4,
            "step": [0, 10, 20, 30],
            "n": [10, 10, 10, 30],
            "clipped_frac": [1.0, 0.0, 0.0, 0.5],
        }
    )
    got = charts.rolling_fraction(df, "clipped_frac", points=2)  # windows of 2 buckets
    assert got.tolist() == pytest.approx([1.0, 0.5, 0.0, 15 / 40])


def test_serve_command_line(tmp_path):
    cmd = serve.command(tmp_path, host="0.0.0.0", port=9123, headless=False)
    assert cmd[:4] == [sys.executable, "-m", "streamlit", "run"]
    assert Path(cmd[4]).name == "app.py" and Path(cmd[4]).is_file()
    args = dict(zip(cmd[5:-3:2], cmd[6:-3:2], strict=True))
    assert args["--server.address"] == "0.0.0.0"
    assert args["--server.port"] == "9123"
    assert args["--server.headless"] == "false"
    assert args["--browser.gatherUsageStats"] == "false"
    assert cmd[-3:] == ["--", "--workspace", str(tmp_path.resolve())]
    assert serve.command(tmp_path)[5:9] == [
        "--server.address",
        "127.0.0.1",
        "--server.port",
        "8501",
    ]


def test_serve_returns_streamlits_exit_code(tmp_path, monkeypatch):
    """`serve` runs what `command` builds (here a stand-in that reports its workspace and
    port, then exits 3) and returns its exit code."""
    seen = tmp_path / "seen"

    def stand_in(workspace, host, port, headless):
        report = f"import os, sys; open({str(seen)!r}, 'w').write(os.environ['ESM3_WORKSPACE'] + ' {port}'); sys.exit(3)"
        return [sys.executable, "-c", report]

    monkeypatch.setattr(serve, "command", stand_in)
    assert serve.serve(tmp_path, port=8600) == 3
    assert seen.read_text() == f"{tmp_path.resolve()} 8600"
    assert serve.main(["--workspace", str(tmp_path), "--port", "8601"]) == 3
    assert seen.read_text() == f"{tmp_path.resolve()} 8601"


def test_workspace_resolution(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["app.py"])
    monkeypatch.delenv("ESM3_WORKSPACE", raising=False)
    monkeypatch.chdir(tmp_path)
    assert common.workspace() == tmp_path / "workspace"
    monkeypatch.setenv("ESM3_WORKSPACE", str(tmp_path / "env"))
    assert common.workspace() == tmp_path / "env"
    monkeypatch.setattr(sys, "argv", ["app.py", "--workspace", str(tmp_path / "arg")])
    assert common.workspace() == tmp_path / "arg"  # the command line wins


def test_token_units():
    assert common.fmt_tokens(54.6e9) == "54.6B"
    assert common.fmt_tokens(105.5e9) == "105.5B"
    assert common.fmt_tokens(1_572_864) == "1.573M"
    assert common.fmt_tokens(None) == "–"
