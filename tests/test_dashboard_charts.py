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


# -- axis formats: every quantitative axis of every chart builder names a readable format ----


def _curves(runs=("r1", "r2"), buckets=30) -> pd.DataFrame:
    rows = []
    for run in runs:
        for i in range(buckets):
            row = {"run_id": run, "step": i * 1000, "width": 1000, "n": 1000}
            row |= {"nonfinite": int(i == 3), "skipped": int(i == 4), "clipped_frac": 0.25}
            for m in ("loss", "loss_sequence", "grad_norm", "lr"):
                row |= {m: 1.0 + i, f"{m}_min": 0.5 + i, f"{m}_max": 1.5 + i}
            rows.append(row)
    return pd.DataFrame(rows)


def _events() -> pd.DataFrame:
    return pd.DataFrame({"run_id": ["r1"], "step": [3000], "kind": ["spike"], "message": ["x"]})


def _samples() -> dict:
    """One call per chart builder, on small frames shaped as its page passes them."""
    curves = _curves()
    stages = pd.DataFrame({"run_id": ["r1"], "step": [5000], "message": ["stage 2"]})
    val = pd.DataFrame({"run_id": ["r1"], "step": [2000], "track": ["loss"], "value": [2.0]})
    types = pd.DataFrame(
        {"dataset": ["UniRef", "PDB"], "type": ["sequence", "structure"], "v": [30.5, 0.2]}
    )
    seen = pd.DataFrame(
        {"dataset": ["UniRef"], "tokens_seen": [0.3], "dataset_tokens": [30.0], "epochs": [0.01]}
    )
    curve = pd.DataFrame(
        {"dataset": ["UniRef"] * 3, "tokens_drawn": [0.1, 1, 10], "unique_tokens": [0.1, 1, 9]}
    )
    pts = pd.DataFrame({"dataset": ["UniRef"], "tokens_seen": [0.3], "unique_tokens": [0.3]})
    counts = pd.DataFrame(
        {"run_id": ["r1", "r1"], "stage": ["train", "train"], "state": ["RUNNING", "FAILED"]}
        | {"tasks": [3, 1]}
    )
    rejects = pd.DataFrame(
        {"stage": ["seq"], "reason": ["too_short"], "records": [7], "files": [1]}
        | {"example": ["x"]}
    )
    own = pd.DataFrame(
        {"run_id": ["r1"] * 3, "metric": ["codes_used"] * 3, "step": [0, 10, 20]}
        | {"width": [10] * 3, "value": [1.0, 2.0, 3.0]}
    )
    long = charts.loss_long(curves, ["loss", "loss_sequence"], 0.9, stages, val)
    return {
        "loss_facets": charts.loss_facets(long, log_y=True, show_raw=True),
        "metric_chart": charts.metric_chart(
            curves, "grad_norm", "L2 norm", title="g", threshold=1.0, events=_events()
        ),
        "count_bars": charts.count_bars(curves),
        "type_bars": charts.type_bars(types, "v", "t", "tokens (billions)"),
        "seen_vs_unique": charts.seen_vs_unique(curve, pts),
        "seen_bars": charts.seen_bars(seen),
        "state_bars": charts.state_bars(counts),
        "reject_bars": charts.reject_bars(rejects),
        "metric_facets": charts.metric_facets(own),
    }


def _axes(spec, found=None) -> list[tuple[str, dict]]:
    """(channel, encoding) of every positional quantitative field encoding in a spec."""
    found = [] if found is None else found
    if isinstance(spec, dict):
        enc = spec.get("encoding")
        if isinstance(enc, dict):
            for ch in ("x", "y"):
                e = enc.get(ch)
                if isinstance(e, dict) and e.get("type") == "quantitative" and "field" in e:
                    found.append((ch, e))
        for v in spec.values():
            _axes(v, found)
    elif isinstance(spec, list):
        for v in spec:
            _axes(v, found)
    return found


def _builders() -> set[str]:
    import inspect

    return {
        name
        for name, fn in vars(charts).items()
        if inspect.isfunction(fn)
        and fn.__module__ == charts.__name__
        and not name.startswith("_")
        and "alt." in str(inspect.signature(fn).return_annotation)
        and name not in ("axis", "step_x")
    }


def test_every_chart_builder_is_checked_for_axis_formats():
    """A new chart builder must be added to `_samples`, so its axes are checked below."""
    assert _builders() == set(_samples())


@pytest.mark.parametrize("name", sorted(_samples()))
def test_every_quantitative_axis_has_a_readable_format(name):
    spec = _samples()[name].to_dict()
    axes = _axes(spec)
    assert axes, f"{name}: no quantitative axis found"
    for ch, e in axes:
        field = e.get("field")
        ax = e.get("axis", {})
        if ax is None:  # a hidden axis prints nothing
            continue
        fmt = ax.get("format")
        assert fmt, f"{name}: {ch} axis of {field!r} has no format (Vega prints 100.000000)"
        assert fmt in (
            charts.STEP_FORMAT,
            charts.COUNT_FORMAT,
            charts.PERCENT_FORMAT,
            charts.NUMBER_FORMAT,
            charts.SCALED_FORMAT,
        ), f"{name}: {ch} axis of {field!r} has format {fmt!r}, not one of charts' formats"
        if field == "step" or e.get("aggregate") in ("sum", "count") or fmt == charts.COUNT_FORMAT:
            # counts: integer ticks only
            assert fmt in (charts.STEP_FORMAT, charts.COUNT_FORMAT), (name, field, fmt)
            assert ax.get("tickMinStep") == 1, f"{name}: {field!r} may get fractional ticks"


def test_fraction_axes_print_percentages():
    """The stability page's clipped-steps chart: a fraction with a percent axis."""
    df = _curves().assign(clipped_rate=0.25)
    spec = charts.metric_chart(
        df, "clipped_rate", "clipped steps", title="c", band=False,
        y_format=charts.PERCENT_FORMAT,
    ).to_dict()  # fmt: skip
    fmts = {e["field"]: e["axis"]["format"] for _, e in _axes(spec)}
    assert fmts == {"step": charts.STEP_FORMAT, "clipped_rate": charts.PERCENT_FORMAT}


def test_formats_render_as_intended():
    """The d3 formats, as Vega renders them (d3-format semantics, checked by hand)."""
    assert charts.axis(charts.COUNT_FORMAT).to_dict() == {"format": ",d", "tickMinStep": 1}
    assert charts.axis(charts.PERCENT_FORMAT).to_dict() == {"format": ".0%"}
