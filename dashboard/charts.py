"""Altair charts for the dashboard: DataFrames from `esm3.metrics.queries` in, charts out.

Presentation only: no queries here. Every chart names its axes with units.
"""

from __future__ import annotations

from collections.abc import Sequence

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
EVENT_COLORS = {
    "spike": "#ff7f0e",
    "nonfinite": "#9467bd",
    "skip": "#bcbd22",
    "rollback": "#d62728",
    "requeue": "#17becf",
    "resume": "#17becf",
    "restart": "#17becf",
    "stage": "#555555",
}
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


def _event_rules(events: pd.DataFrame, y_title: str | None = None) -> alt.Chart | None:
    if events is None or events.empty:
        return None
    ev = events.dropna(subset=["step"]).copy()
    if ev.empty:
        return None
    kinds = sorted(ev["kind"].unique())
    return (
        alt.Chart(ev)
        .mark_rule(strokeDash=[4, 3], strokeWidth=1.5, opacity=0.8)
        .encode(
            x=alt.X("step:Q"),
            color=alt.Color(
                "kind:N",
                title="event",
                scale=alt.Scale(domain=kinds, range=[EVENT_COLORS.get(k, "#444") for k in kinds]),
                legend=alt.Legend(orient="bottom"),
            ),
            tooltip=["run_id", "step", "kind", "message"],
        )
    )


def loss_chart(
    curves: pd.DataFrame,
    track: str,
    *,
    smoothing: float,
    log_y: bool,
    show_raw: bool,
    stages: pd.DataFrame | None = None,
    validation: pd.DataFrame | None = None,
) -> alt.LayerChart:
    """One track's loss per run: raw bucket means (faint), EMA (solid), min-max band,
    stage boundaries (dashed rules) and validation losses (points).

    `curves`: rows of `queries.series` with columns run_id, step, width, `track`,
    `track`_min, `track`_max.
    """
    rows = []
    for run_id, g in curves.groupby("run_id", sort=False):
        g = g.sort_values("step")
        rows.append(
            pd.DataFrame(
                {
                    "run_id": run_id,
                    "step": g["step"].to_numpy(),
                    "raw": g[track].to_numpy(dtype=float),
                    "lo": g[f"{track}_min"].to_numpy(dtype=float),
                    "hi": g[f"{track}_max"].to_numpy(dtype=float),
                    "smoothed": ema(g[track].to_numpy(dtype=float), smoothing, g["width"]),
                }
            )
        )
    df = pd.concat(rows) if rows else pd.DataFrame(columns=["run_id", "step", "raw", "smoothed"])
    df = df.replace([np.inf, -np.inf], np.nan)
    scale = alt.Scale(type="log" if log_y else "linear", zero=False)
    y_title = f"{TRACK_TITLES.get(track, track)} loss (nats/token)"
    x = alt.X("step:Q", title="step")
    color = alt.Color("run_id:N", title="run", legend=alt.Legend(orient="bottom"))
    base = alt.Chart(df)
    layers = []
    if show_raw:
        layers.append(
            base.mark_area(opacity=0.12).encode(
                x=x, y=alt.Y("lo:Q", scale=scale, title=y_title), y2="hi:Q", color=color
            )
        )
        layers.append(
            base.mark_line(opacity=0.35, strokeWidth=1).encode(
                x=x, y=alt.Y("raw:Q", scale=scale, title=y_title), color=color
            )
        )
    layers.append(
        base.mark_line(strokeWidth=2).encode(
            x=x,
            y=alt.Y("smoothed:Q", scale=scale, title=y_title),
            color=color,
            tooltip=[
                "run_id",
                "step",
                alt.Tooltip("smoothed:Q", format=".4f", title="smoothed"),
                alt.Tooltip("raw:Q", format=".4f", title="bucket mean"),
            ],
        )
    )
    if stages is not None and not stages.empty:
        layers.append(
            alt.Chart(stages)
            .mark_rule(strokeDash=[6, 4], color="#555")
            .encode(x="step:Q", tooltip=["run_id", "step", "message"])
        )
    if validation is not None and not validation.empty:
        v = validation[validation["track"] == track]
        if not v.empty:
            layers.append(
                alt.Chart(v)
                .mark_point(shape="diamond", size=60, filled=True)
                .encode(
                    x="step:Q",
                    y=alt.Y("value:Q", scale=scale),
                    color=color,
                    tooltip=["run_id", "step", alt.Tooltip("value:Q", format=".4f")],
                )
            )
    return (
        alt.layer(*layers)
        .properties(title=TRACK_TITLES.get(track, track), height=HEIGHT)
        .interactive(bind_y=False)
    )


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
    band: bool = True,
) -> alt.LayerChart:
    """A downsampled per-run curve with optional min-max band, a horizontal threshold and
    event rules. `agg`: 'mean' plots `column`, 'max' plots `column`_max."""
    y_col = column if agg == "mean" else f"{column}_{agg}"
    df = curves.replace([np.inf, -np.inf], np.nan)
    scale = alt.Scale(type="log" if log_y else "linear", zero=False)
    x = alt.X("step:Q", title="step")
    color = alt.Color("run_id:N", title="run", legend=alt.Legend(orient="bottom"))
    layers = []
    if band and f"{column}_min" in df and f"{column}_max" in df:
        layers.append(
            alt.Chart(df)
            .mark_area(opacity=0.15)
            .encode(
                x=x,
                y=alt.Y(f"{column}_min:Q", scale=scale, title=y_title),
                y2=f"{column}_max:Q",
                color=color,
            )
        )
    layers.append(
        alt.Chart(df)
        .mark_line(strokeWidth=1.6)
        .encode(
            x=x,
            y=alt.Y(f"{y_col}:Q", scale=scale, title=y_title),
            color=color,
            tooltip=["run_id", "step", alt.Tooltip(f"{y_col}:Q", format=".4g")],
        )
    )
    if threshold is not None:
        t = pd.DataFrame({"y": [threshold], "label": [threshold_label]})
        layers.append(alt.Chart(t).mark_rule(color="#d62728", strokeDash=[2, 2]).encode(y="y:Q"))
        layers.append(
            alt.Chart(t)
            .mark_text(align="left", dx=4, dy=-6, color="#d62728")
            .encode(y="y:Q", text="label:N", x=alt.value(0))
        )
    rules = _event_rules(events)
    if rules is not None:
        layers.append(rules)
    return (
        alt.layer(*layers)
        .resolve_scale(color="independent")
        .properties(title=title, height=HEIGHT)
        .interactive(bind_y=False)
    )


def count_bars(curves: pd.DataFrame) -> alt.Chart:
    """Non-finite and skipped steps per bucket, per run."""
    long = curves.melt(
        id_vars=["run_id", "step", "width"], value_vars=["nonfinite", "skipped"], var_name="what"
    )
    long = long[long["value"] > 0]
    return (
        alt.Chart(long)
        .mark_bar(size=6)
        .encode(
            x=alt.X("step:Q", title="step"),
            y=alt.Y("sum(value):Q", title="steps (per bucket)"),
            color=alt.Color(
                "what:N",
                title="",
                scale=alt.Scale(domain=["nonfinite", "skipped"], range=["#9467bd", "#bcbd22"]),
                legend=alt.Legend(orient="bottom"),
            ),
            tooltip=["run_id", "step", "what", "value"],
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
            x=alt.X(f"{value}:Q", title=x_title),
            color=alt.Color(
                "type:N",
                title="type",
                scale=alt.Scale(domain=types, range=[TYPE_COLORS.get(t, "#888") for t in types]),
                legend=alt.Legend(orient="bottom"),
            ),
            yOffset="type:N",
            tooltip=["dataset", "type", alt.Tooltip(f"{value}:Q", format=",.3~f")],
        )
        .properties(title=title, height=alt.Step(14))
    )


def seen_vs_unique(curves: pd.DataFrame, points: pd.DataFrame) -> alt.LayerChart:
    """Expected unique tokens against tokens drawn per dataset (log-log), with the run's
    position on each curve. `curves`: dataset, tokens_drawn, unique_tokens (billions);
    `points`: dataset, tokens_seen, unique_tokens (billions)."""
    x = alt.X(
        "tokens_drawn:Q",
        title="tokens drawn from the dataset (billions)",
        scale=alt.Scale(type="log"),
    )
    y = alt.Y(
        "unique_tokens:Q", title="expected unique tokens (billions)", scale=alt.Scale(type="log")
    )
    color = alt.Color("dataset:N", title="dataset", legend=alt.Legend(orient="bottom", columns=4))
    line = alt.Chart(curves).mark_line().encode(x=x, y=y, color=color)
    pts = (
        alt.Chart(points)
        .mark_point(size=90, filled=True, shape="circle", stroke="black", strokeWidth=1)
        .encode(
            x=alt.X("tokens_seen:Q"),
            y="unique_tokens:Q",
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
    """Tokens seen per dataset (bars) against the dataset's size (ticks), in billions."""
    bars = (
        alt.Chart(df)
        .mark_bar()
        .encode(
            y=alt.Y("dataset:N", title=None, sort="-x"),
            x=alt.X("tokens_seen:Q", title="tokens (billions)"),
            tooltip=[
                "dataset",
                alt.Tooltip("tokens_seen:Q", format=",.3f", title="seen (B)"),
                alt.Tooltip("dataset_tokens:Q", format=",.3f", title="dataset (B)"),
                alt.Tooltip("epochs:Q", format=".4f"),
            ],
        )
    )
    ticks = (
        alt.Chart(df.dropna(subset=["dataset_tokens"]))
        .mark_tick(color="#d62728", thickness=2, size=18)
        .encode(y=alt.Y("dataset:N", sort="-x"), x="dataset_tokens:Q")
    )
    return alt.layer(bars, ticks).properties(
        title="Tokens seen per dataset (bars) and dataset size (red ticks)", height=alt.Step(22)
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
            y=alt.Y("group:N", title=None),
            x=alt.X("sum(tasks):Q", title="tasks (latest attempt)"),
            color=alt.Color(
                "state:N",
                title="state",
                scale=alt.Scale(domain=states, range=[STATE_COLORS.get(s, "#888") for s in states]),
                legend=alt.Legend(orient="bottom"),
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
            x=alt.X("records:Q", title="records refused"),
            tooltip=["stage", "reason", "records", "files", "example"],
        )
        .properties(title="Rejected records by reason", height=alt.Step(24))
    )
