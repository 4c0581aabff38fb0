"""Loss: per-track curves of one or several runs, raw and smoothed, with stage boundaries
and validation losses. Curves are downsampled in SQL to at most `points` per run."""

from __future__ import annotations

import streamlit as st

from dashboard import charts, common
from esm3.metrics import queries

st.title("Loss")
ws = common.workspace()

with common.Data(ws, report=False) as data:  # the live part reports
    common.require_training_steps(
        ws, data, "Loss curves appear once a training run logs its steps."
    )
    c = st.columns(2)
    with c[0]:
        runs = common.pick_runs(data)
    tracks = c[1].multiselect(
        "Tracks",
        list(queries.LOSS_TRACKS),
        default=[t for t in queries.LOSS_TRACKS if t != "loss"],
        format_func=lambda t: charts.TRACK_TITLES.get(t, t),
        key="loss_tracks",
    )
    c = st.columns([4, 1, 1])
    smoothing = c[0].slider(
        "Smoothing (EMA weight per step)",
        0.0,
        0.999,
        0.9,
        0.001,
        format="%.3f",
        key="loss_smoothing",
        help="0 shows the bucket means as they are; closer to 1 smooths more.",
    )
    log_y = c[1].toggle("Log scale", key="loss_log")
    show_raw = c[2].toggle(
        "Raw curves", value=True, key="loss_raw", help="Bucket means (faint) and min-max band"
    )
    points = st.sidebar.select_slider(
        "Points per curve",
        [250, 500, 1000, 2000, 4000],
        value=2000,
        key="loss_points",
        help="Each run's steps are bucketed in SQL into at most this many points.",
    )


@st.fragment(run_every=common.run_every())
def curves() -> None:
    if not runs or not tracks:
        st.info("Pick at least one run and one track.")
        return
    with common.Data(ws) as data, common.section("the loss curves"):
        df = data(queries.series, runs, list(queries.LOSS_TRACKS), max_points=points)
        stages = data(queries.stage_boundaries, runs)
        val = data(queries.validation_loss, runs)
        last = df.sort_values("step").groupby("run_id").tail(1).set_index("run_id")
        cols = st.columns(min(4, len(runs)))
        for i, run in enumerate(runs):
            if run in last.index:
                row = last.loc[run]
                cols[i % len(cols)].metric(
                    f"{run} · loss at step {int(row['step'] + row['width'] - 1):,}",
                    common.fmt_float(row["loss"]),
                    border=True,
                    help="mean over the last bucket of steps",
                )
        width = int(df["width"].max()) if not df.empty else 1
        st.caption(
            f"{len(df):,} points from {int(df['n'].sum()):,} steps "
            f"({width:,} step{'s' if width > 1 else ''} per point at most); "
            f"{len(stages)} stage change{'s' if len(stages) != 1 else ''}, "
            f"{val['step'].nunique() if not val.empty else 0} validation evaluations."
        )
        st.altair_chart(
            charts.loss_facets(
                charts.loss_long(df, tracks, smoothing, stages, val),
                log_y=log_y,
                show_raw=show_raw,
                columns=2 if len(tracks) > 1 else 1,
                width=380 if len(tracks) > 1 else 820,
            ),
            width="content",
        )
        st.caption(
            "Faint lines: mean of each bucket of steps, with its min-max band; solid: EMA; "
            "dashed rules: stage changes; diamonds: validation loss."
        )
        own = data(queries.model_metrics, runs, max_points=min(points, 500))
        if not own.empty:  # the structure tokenizer: its losses and codebook usage
            st.subheader("Model metrics")
            st.altair_chart(charts.metric_facets(own), width="content")
            st.caption(
                "Per-step values a model reports beyond the track losses "
                "(train_steps.metrics): the structure tokenizer's losses, the codes it used, "
                "their perplexity and the dead codes it restarted."
            )


curves()
