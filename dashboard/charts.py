"""Altair charts for the dashboard: DataFrames from `esm3.metrics.queries` in, charts out.

Presentation only: no queries here. Every chart names its axes with units.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import altair as alt
import numpy as np
import pandas as pd

STATE_COLORS = {
    "SUBMITTED": "#9aa5b1",
    "PENDING": "#c3cad3",
    "RUNNING": "#1f77b4",
    "REQUEUED": "#f2a93b",
    "COMPLETED": "#2ca02c",
    "FAILED": "#d62728",
    "TIMEOUT": "#9467bd",
    "LOST": "#8c564b",
    "CANCELLED": "#7f7f7f",
}
# event colours stay clear of the run palette below; the pages' captions name them
EVENT_COLORS = {
    "spike": "#ff7f0e",
    "nonfinite": "#9467bd",
    "skip": "#888888",
    "rollback": "#d62728",
    "requeue": "#222222",
    "resume": "#222222",
    "restart": "#222222",
    "stage": "#555555",
}
EVENT_CAPTION = (
    "Dashed rules: :orange[spike], :violet[non-finite step], :gray[skipped step], "
    ":red[rollback], black: requeue or restart."
)
TYPE_COLORS = {"sequence": "#1f77b4", "structure": "#2ca02c", "annotation": "#ff7f0e"}
TRACK_TITLES = {
    "loss": "total loss",
    "loss_sequence": "sequence",
    "loss_structure": "structure tokens",
    "loss_ss8": "SS8",
    "loss_sasa": "SASA",
    "loss_function": "function tokens",
    "loss_residue": "residue annotations",
}
HEIGHT = 260

# Axis formats (d3-format). Every quantitative axis names one (tests/test_dashboard_charts.py
# checks), so no axis prints Vega's default "100.000000" or a fractional count.
STEP_FORMAT = "~s"  # steps and other large counts: SI suffixes, 250k, 1.2M
COUNT_FORMAT = ",d"  # small counts: integers only (with tickMinStep=1)
PERCENT_FORMAT = ".0%"  # fractions in [0, 1]
NUMBER_FORMAT = "~g"  # losses, norms, logits, rates: shortest form, 2.5, 0.0004, 1e-7
SCALED_FORMAT = ",~g"  # values already in a unit of the title (billions, millions)


def axis(fmt: str, **kw) -> alt.Axis:
    """An axis with a d3 format; counts (integer formats) never get fractional ticks."""
    if fmt in (COUNT_FORMAT, STEP_FORMAT, "d"):
        kw.setdefault("tickMinStep", 1)
    return alt.Axis(format=fmt, **kw)


def step_x(**kw) -> alt.X:
    return alt.X("step:Q", title="step", axis=axis(STEP_FORMAT), **kw)


def _value_y(scale: alt.Scale, title: str, fmt: str) -> Callable[[str], alt.Y]:
    """The y encoding every layer of one chart shares (scale, title, format), by field."""
    return lambda field: alt.Y(f"{field}:Q", scale=scale, title=title, axis=axis(fmt))


RUN_SCALE = alt.Scale(
    range=["#1f77b4", "#2ca02c", "#17becf", "#8c564b", "#bcbd22", "#aec7e8", "#98df8a", "#6b6ecf"]
)


def ema(values: Sequence[float], smoothing: float, width: int | Sequence[int] = 1) -> np.ndarray:
    """Debiased exponential moving average, as TensorBoard's smoothing slider.

    `smoothing` in [0, 1) is the weight kept per step; a point that stands for `width`
    steps (a bucket of a downsampled curve) decays it `width` times, so the smoothing
    means the same whatever the bucket size. NaN/inf values are skipped (carried over).
    Shape: (n,) -> (n,).
    """
    x = np.asarray(values, dtype=float)
    w = np.broadcast_to(np.asarray(width, dtype=float), x.shape)
    out = np.full_like(x, np.nan)
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
    acc = 0.0
    norm = 0.0
    for i, v in enumerate(x):
        if np.isfinite(v):
            keep = smoothing ** w[i]
            acc = keep * acc + (1.0 - keep) * v
            norm = keep * norm + (1.0 - keep)
        out[i] = acc / norm if norm > 0 else np.nan
    return out


def _event_rules(events: pd.DataFrame | None, legend: bool = True) -> alt.Chart | None:
    """Dashed vertical rules at event steps, coloured by kind through the `stroke` channel
    (so the runs keep their own `color` legend)."""
    if events is None or events.empty:
        return None
    ev = events.dropna(subset=["step"])
    if ev.empty:
        return None
    kinds = [k for k in EVENT_COLORS if k in set(ev["kind"])] + sorted(
        set(ev["kind"]) - set(EVENT_COLORS)
    )
    return (
        alt.Chart(ev)
        .mark_rule(strokeDash=[4, 3], strokeWidth=1.5, opacity=0.85)
        .encode(
            x=step_x(),
            # explicit pixel extent: a rule with no y breaks the layout on a log y scale
            y=alt.value(0),
            y2=alt.value("height"),
            stroke=alt.Stroke(
                "kind:N",
                title="event",
                scale=alt.Scale(domain=kinds, range=[EVENT_COLORS.get(k, "#444") for k in kinds]),
                legend=alt.Legend() if legend else None,
            ),
            tooltip=["run_id:N", "step:Q", "kind:N", "message:N"],
        )
    )


def loss_long(
    curves: pd.DataFrame,
    tracks: Sequence[str],
    smoothing: float,
    stages: pd.DataFrame | None = None,
    validation: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """One long frame for the faceted loss chart: per (track, run, bucket) the bucket mean
    (raw), min (lo), max (hi) and the EMA (smoothed); stage boundaries repeated in every
    track; validation losses. Column `layer` says which ('curve', 'stage', 'validation')."""
    parts = []
    for track in tracks:
        for run_id, g in curves.groupby("run_id", sort=False):
            g = g.sort_values("step")
            raw = g[track].to_numpy(dtype=float)
            parts.append(
                pd.DataFrame(
                    {
                        "layer": "curve",
                        "track": TRACK_TITLES.get(track, track),
                        "run_id": run_id,
                        "step": g["step"].to_numpy(),
                        "raw": raw,
                        "lo": g[f"{track}_min"].to_numpy(dtype=float),
                        "hi": g[f"{track}_max"].to_numpy(dtype=float),
                        "smoothed": ema(raw, smoothing, g["width"].to_numpy()),
                    }
                )
            )
        if stages is not None and not stages.empty:
            parts.append(
                stages.assign(layer="stage", track=TRACK_TITLES.get(track, track))[
                    ["layer", "track", "run_id", "step", "message"]
                ]
            )
        if validation is not None and not validation.empty:
            v = validation[validation["track"] == track]
            if not v.empty:
                parts.append(
                    v.assign(layer="validation", track=TRACK_TITLES.get(track, track))[
                        ["layer", "track", "run_id", "step", "value"]
                    ]
                )
    if not parts:
        return pd.DataFrame(columns=["layer", "track", "run_id", "step", "raw", "smoothed"])
    return pd.concat(parts, ignore_index=True).replace([np.inf, -np.inf], np.nan)


def loss_facets(
    long: pd.DataFrame, *, log_y: bool, show_raw: bool, columns: int = 2, width: int = 440
) -> alt.FacetChart:
    """Small multiples, one per track: raw bucket means (faint) with their min-max band,
    the EMA (solid), stage boundaries (dashed rules), validation losses (diamonds)."""
    scale = alt.Scale(type="log" if log_y else "linear", zero=False)
    y = _value_y(scale, "loss (nats/token)", NUMBER_FORMAT)
    x = step_x()
    color = alt.Color("run_id:N", title="run", scale=RUN_SCALE)
    curve = alt.Chart().transform_filter(alt.datum.layer == "curve")
    # the EMA goes first so the run legend draws line symbols; the faint layers add none
    layers = [
        curve.mark_line(strokeWidth=2).encode(
            x=x,
            y=y("smoothed"),
            color=alt.Color(
                "run_id:N", title="run", scale=RUN_SCALE, legend=alt.Legend(symbolType="stroke")
            ),
            tooltip=[
                "track:N",
                "run_id:N",
                "step:Q",
                alt.Tooltip("smoothed:Q", format=".4f", title="smoothed"),
                alt.Tooltip("raw:Q", format=".4f", title="bucket mean"),
            ],
        )
    ]
    if show_raw:
        faint = alt.Color("run_id:N", scale=RUN_SCALE, legend=None)
        layers.append(
            curve.mark_line(opacity=0.3, strokeWidth=1).encode(x=x, y=y("raw"), color=faint)
        )
        layers.append(
            curve.mark_area(opacity=0.1).encode(
                x=x,
                y=y("lo"),
                y2="hi:Q",
                color=faint,
            )
        )
    if (long["layer"] == "stage").any():
        layers.append(
            alt.Chart()
            .transform_filter(alt.datum.layer == "stage")
            .mark_rule(strokeDash=[6, 4], color="#555", strokeWidth=1.5)
            .encode(
                x=x,
                y=alt.value(0),
                y2=alt.value("height"),
                tooltip=["run_id:N", "step:Q", "message:N"],
            )
        )
    if (long["layer"] == "validation").any():
        layers.append(
            alt.Chart()
            .transform_filter(alt.datum.layer == "validation")
            .mark_point(shape="diamond", size=70, filled=True, opacity=1)
            .encode(
                x=x,
                y=y("value"),
                color=color,
                tooltip=[
                    "run_id:N",
                    "step:Q",
                    alt.Tooltip("value:Q", format=".4f", title="validation"),
                ],
            )
        )
    order = [TRACK_TITLES.get(t, t) for t in TRACK_TITLES if TRACK_TITLES[t] in set(long["track"])]
    return (
        alt.layer(*layers, data=long)
        .properties(width=width, height=HEIGHT - 40)
        .facet(facet=alt.Facet("track:N", title=None, sort=order), columns=columns)
        .resolve_scale(y="independent")
    )


def rolling_fraction(curves: pd.DataFrame, column: str, points: int = 100) -> pd.Series:
    """Per run, a rolling mean of the per-bucket fraction `column`, weighted by rows (n),
    over about 1/`points` of the run: per-step 0/1 flags read as a rate."""
    out = pd.Series(np.nan, index=curves.index, dtype=float)
    for _, g in curves.groupby("run_id", sort=False):
        g = g.sort_values("step")
        win = max(1, len(g) // points)
        hits = (g[column] * g["n"]).rolling(win, min_periods=1).sum()
        out.loc[g.index] = hits / g["n"].rolling(win, min_periods=1).sum()
    return out


def metric_chart(
    curves: pd.DataFrame,
    column: str,
    y_title: str,
    *,
    title: str,
    agg: str = "mean",
    log_y: bool = False,
    threshold: float | None = None,
    threshold_label: str = "",
    events: pd.DataFrame | None = None,
    event_legend: bool = False,
    band: bool = True,
    y_format: str = NUMBER_FORMAT,
) -> alt.LayerChart:
    """A downsampled per-run curve with optional min-max band, a horizontal threshold and
    event rules. `agg`: 'mean' plots `column`, 'max' plots `column`_max. `y_format`: the
    y axis's d3 format (PERCENT_FORMAT for a fraction)."""
    y_col = column if agg == "mean" else f"{column}_{agg}"
    df = curves.replace([np.inf, -np.inf], np.nan)
    if log_y:  # a log axis cannot show zeros
        for c in (y_col, f"{column}_min", f"{column}_max"):
            if c in df:
                df[c] = df[c].where(df[c] > 0)
    scale = alt.Scale(type="log" if log_y else "linear", zero=False)
    x = step_x()
    y = _value_y(scale, y_title, y_format)
    color = alt.Color(
        "run_id:N", title="run", scale=RUN_SCALE, legend=alt.Legend(symbolType="stroke")
    )
    layers = []
    # the line goes first so the shared run legend draws line symbols; the band adds none
    layers.append(
        alt.Chart(df)
        .mark_line(strokeWidth=1.6)
        .encode(
            x=x,
            y=y(y_col),
            color=color,
            tooltip=[
                "run_id:N",
                alt.Tooltip("step:Q", format=","),
                alt.Tooltip(
                    f"{y_col}:Q",
                    format=".2%" if y_format == PERCENT_FORMAT else ".4g",
                    title=y_title,
                ),
            ],
        )
    )
    if band and f"{column}_min" in df and f"{column}_max" in df:
        layers.append(
            alt.Chart(df)
            .mark_area(opacity=0.15)
            .encode(
                x=x,
                y=y(f"{column}_min"),
                y2=f"{column}_max:Q",
                color=alt.Color("run_id:N", scale=RUN_SCALE, legend=None),
            )
        )
    if threshold is not None:
        t = pd.DataFrame({"y": [threshold], "label": [threshold_label]})
        layers.append(
            alt.Chart(t)
            .mark_rule(color="#d62728", strokeWidth=2, strokeDash=[6, 3])
            .encode(y=y("y"))
        )
        layers.append(
            alt.Chart(t)
            .mark_text(align="right", baseline="bottom", dx=-4, dy=-3, color="#d62728")
            .encode(
                y=y("y"),
                x=alt.value("width"),
                text="label:N",
            )
        )
    rules = _event_rules(events, legend=event_legend)
    if rules is not None:
        layers.append(rules)
    return alt.layer(*layers).properties(title=title, height=HEIGHT).interactive(bind_y=False)


def count_bars(curves: pd.DataFrame) -> alt.Chart:
    """Non-finite and skipped steps per bucket, per run, on the runs' full step range."""
    long = curves.melt(
        id_vars=["run_id", "step", "width"], value_vars=["nonfinite", "skipped"], var_name="what"
    )
    long = long[long["value"] > 0]
    lo = float(curves["step"].min()) if not curves.empty else 0.0
    hi = float((curves["step"] + curves["width"]).max()) if not curves.empty else 1.0
    return (
        alt.Chart(long)
        .mark_bar(size=5)
        .encode(
            x=step_x(scale=alt.Scale(domain=[lo, hi])),
            y=alt.Y("sum(value):Q", title="steps", axis=axis(COUNT_FORMAT)),
            color=alt.Color(
                "what:N",
                title="",
                scale=alt.Scale(domain=["nonfinite", "skipped"], range=["#9467bd", "#bcbd22"]),
            ),
            tooltip=["run_id:N", "step:Q", "what:N", "value:Q"],
        )
        .properties(title="Non-finite and skipped steps", height=HEIGHT)
    )


def type_bars(df: pd.DataFrame, value: str, title: str, x_title: str) -> alt.Chart:
    """Horizontal bars per dataset, coloured by data type."""
    types = [t for t in TYPE_COLORS if t in set(df["type"])] + sorted(
        set(df["type"]) - set(TYPE_COLORS)
    )
    return (
        alt.Chart(df)
        .mark_bar()
        .encode(
            y=alt.Y("dataset:N", sort="-x", title=None),
            x=alt.X(f"{value}:Q", title=x_title, axis=axis(SCALED_FORMAT)),
            color=alt.Color(
                "type:N",
                title="type",
                scale=alt.Scale(domain=types, range=[TYPE_COLORS.get(t, "#888") for t in types]),
            ),
            tooltip=["dataset", "type", alt.Tooltip(f"{value}:Q", format=",.3~f")],
        )
        .properties(title=title, height=alt.Step(22))
    )


def seen_vs_unique(curves: pd.DataFrame, points: pd.DataFrame) -> alt.LayerChart:
    """Expected unique tokens against tokens drawn per dataset (log-log), with the run's
    position on each curve. `curves`: dataset, tokens_drawn, unique_tokens (billions);
    `points`: dataset, tokens_seen, unique_tokens (billions)."""
    x = alt.X(
        "tokens_drawn:Q",
        title="tokens drawn from the dataset (billions)",
        scale=alt.Scale(type="log"),
        axis=axis(SCALED_FORMAT),
    )
    y = alt.Y(
        "unique_tokens:Q",
        title="expected unique tokens (billions)",
        scale=alt.Scale(type="log"),
        axis=axis(SCALED_FORMAT),
    )
    color = alt.Color("dataset:N", title="dataset")
    line = alt.Chart(curves).mark_line().encode(x=x, y=y, color=color)
    pts = (
        alt.Chart(points)
        .mark_point(size=90, filled=True, shape="circle", stroke="black", strokeWidth=1)
        .encode(
            x=alt.X("tokens_seen:Q", scale=alt.Scale(type="log"), axis=axis(SCALED_FORMAT)),
            y=y,
            color=color,
            tooltip=[
                "dataset",
                alt.Tooltip("tokens_seen:Q", format=",.3f", title="seen (B)"),
                alt.Tooltip("unique_tokens:Q", format=",.3f", title="expected unique (B)"),
            ],
        )
    )
    return alt.layer(line, pts).properties(
        title="Tokens seen vs expected unique: n(1 - (1 - 1/n)^k)", height=360
    )


def seen_bars(df: pd.DataFrame) -> alt.LayerChart:
    """Tokens seen per dataset (dots) against the dataset's size (red ticks), in billions
    on a log axis (a run's first steps draw a tiny fraction of each dataset)."""
    x = alt.X(
        "tokens_seen:Q",
        title="tokens (billions, log scale)",
        scale=alt.Scale(type="log"),
        axis=axis(SCALED_FORMAT),
    )
    y = alt.Y("dataset:N", title=None, sort="-x")
    tooltip = [
        "dataset:N",
        alt.Tooltip("tokens_seen:Q", format=",.4f", title="seen (B)"),
        alt.Tooltip("dataset_tokens:Q", format=",.3f", title="dataset (B)"),
        alt.Tooltip("epochs:Q", format=".5f"),
    ]
    rules = (
        alt.Chart(df.dropna(subset=["dataset_tokens"]))
        .mark_rule(color="#bbb")
        .encode(y=y, x=x, x2="dataset_tokens:Q")
    )
    dots = (
        alt.Chart(df)
        .mark_circle(size=110, color="#1f77b4", opacity=1)
        .encode(x=x, y=y, tooltip=tooltip)
    )
    ticks = (
        alt.Chart(df.dropna(subset=["dataset_tokens"]))
        .mark_tick(color="#d62728", thickness=3, size=18)
        .encode(
            y=y,
            x=alt.X(
                "dataset_tokens:Q",
                title="tokens (billions, log scale)",
                scale=alt.Scale(type="log"),
                axis=axis(SCALED_FORMAT),
            ),
            tooltip=tooltip,
        )
    )
    return alt.layer(rules, dots, ticks).properties(
        title="Tokens seen per dataset (blue) and dataset size (red)", height=alt.Step(28)
    )


def state_bars(counts: pd.DataFrame) -> alt.Chart:
    """Tasks per run/stage, stacked by state."""
    df = counts.assign(group=counts["run_id"] + " · " + counts["stage"])
    states = [s for s in STATE_COLORS if s in set(df["state"])] + sorted(
        set(df["state"]) - set(STATE_COLORS)
    )
    return (
        alt.Chart(df)
        .mark_bar()
        .encode(
            y=alt.Y("group:N", title=None, axis=alt.Axis(labelLimit=260)),
            x=alt.X("sum(tasks):Q", title="tasks (latest attempt)", axis=axis(COUNT_FORMAT)),
            color=alt.Color(
                "state:N",
                title="state",
                scale=alt.Scale(domain=states, range=[STATE_COLORS.get(s, "#888") for s in states]),
            ),
            tooltip=["run_id", "stage", "state", "tasks"],
        )
        .properties(title="Task states", height=alt.Step(28))
    )


def reject_bars(df: pd.DataFrame) -> alt.Chart:
    """Rejected records per reason."""
    return (
        alt.Chart(df)
        .mark_bar(color="#d62728")
        .encode(
            y=alt.Y("reason:N", sort="-x", title=None),
            x=alt.X("records:Q", title="records refused", axis=axis(COUNT_FORMAT)),
            tooltip=["stage", "reason", "records", "files", "example"],
        )
        .properties(title="Rejected records by reason", height=alt.Step(24))
    )


def metric_facets(df: pd.DataFrame, columns: int = 3, width: int = 250) -> alt.FacetChart:
    """Small multiples of a model's own per-step values (`queries.model_metrics`), one per
    metric, each with its own y scale (losses, codes used and perplexity differ by orders)."""
    chart = (
        alt.Chart()
        .mark_line(strokeWidth=1.5)
        .encode(
            x=step_x(),
            y=alt.Y("value:Q", title=None, scale=alt.Scale(zero=False), axis=axis(NUMBER_FORMAT)),
            color=alt.Color("run_id:N", title="run", scale=RUN_SCALE),
            tooltip=["metric:N", "run_id:N", "step:Q", alt.Tooltip("value:Q", format=".4g")],
        )
        .properties(width=width, height=150)
    )
    return (
        alt.layer(chart, data=df)
        .facet(facet=alt.Facet("metric:N", title=None), columns=columns)
        .resolve_scale(y="independent")
    )
