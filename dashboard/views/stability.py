"""Stability: gradient norm against the clip threshold, clipped fraction, learning rate,
update-to-weight ratio, largest attention logit, non-finite and skipped steps, with
spikes, rollbacks and requeues marked on every curve."""

from __future__ import annotations

import streamlit as st

from dashboard import charts, common
from esm3.metrics import queries

st.title("Stability")
ws = common.workspace()
METRICS = ["grad_norm", "lr", "update_ratio", "max_attn_logit"]

with common.Data(ws, report=False) as data:  # the live part reports
    common.require_training_steps(
        ws, data, "Stability curves appear once a training run logs steps."
    )
    c = st.columns([4, 1, 1])
    with c[0]:
        runs = common.pick_runs(data)
    log_grad = c[1].toggle("Log grad norm", value=True, key="stab_log")
    mark = c[2].toggle("Mark events", value=True, key="stab_mark")
    points = st.sidebar.select_slider(
        "Points per curve", [250, 500, 1000, 2000, 4000], value=2000, key="stab_points"
    )


@st.fragment(run_every=common.run_every())
def curves() -> None:
    if not runs:
        st.info("Pick at least one run.")
        return
    with common.Data(ws) as data:
        with common.section("the stability curves"):
            df = data(queries.series, runs, METRICS, max_points=points)
            ev = data(queries.step_events, runs)
            clip = data(queries.clip_threshold, runs[0])
            marks = ev if mark else None
            k = st.columns(6)
            k[0].metric("Spikes", int((ev["kind"] == "spike").sum()), border=True)
            k[1].metric("Non-finite steps", int(df["nonfinite"].sum()), border=True)
            k[2].metric("Skipped steps", int(df["skipped"].sum()), border=True)
            k[3].metric("Rollbacks", int((ev["kind"] == "rollback").sum()), border=True)
            k[4].metric(
                "Requeues",
                int(ev["kind"].isin(["requeue", "resume", "restart"]).sum()),
                border=True,
            )
            steps = int(df["n"].sum())
            frac = float((df["clipped_frac"] * df["n"]).sum() / steps) if steps else 0.0
            k[5].metric("Clipped steps", f"{frac:.1%}", border=True, help=f"of {steps:,} steps")

            g = st.columns(2)
            g[0].altair_chart(
                charts.metric_chart(
                    df,
                    "grad_norm",
                    "L2 norm",
                    title="Gradient norm (L2, before clipping)",
                    log_y=log_grad,
                    threshold=clip,
                    threshold_label=f"clip threshold {clip:g}",
                    events=marks,
                ),
                width="stretch",
            )
            g[1].altair_chart(
                charts.metric_chart(
                    df.assign(clipped_rate=charts.rolling_fraction(df, "clipped_frac")),
                    "clipped_rate",
                    "clipped steps",
                    title="Clipped steps (rolling mean)",
                    band=False,
                    y_format=charts.PERCENT_FORMAT,
                    events=marks,
                ),
                width="stretch",
            )
            g = st.columns(2)
            g[0].altair_chart(
                charts.metric_chart(
                    df,
                    "lr",
                    "learning rate",
                    title="Learning rate (per step)",
                    band=False,
                    events=marks,
                ),
                width="stretch",
            )
            g[1].altair_chart(
                charts.metric_chart(
                    df,
                    "update_ratio",
                    "‖Δw‖ / ‖w‖",
                    title="Update-to-weight ratio (‖Δw‖ / ‖w‖)",
                    log_y=True,
                    events=marks,
                ),
                width="stretch",
            )
            g = st.columns(2)
            g[0].altair_chart(
                charts.metric_chart(
                    df,
                    "max_attn_logit",
                    "logit",
                    agg="max",
                    title="Largest attention logit (max q·k/√d per bucket)",
                    band=False,
                    events=marks,
                ),
                width="stretch",
            )
            g[1].altair_chart(charts.count_bars(df), width="stretch")
            if mark and not ev.empty:
                st.caption(charts.EVENT_CAPTION)
        with common.section("the stability events"):
            st.subheader("Events")
            if ev.empty:
                st.success(
                    "No spikes, non-finite steps, skips or rollbacks.", icon=":material/check:"
                )
            else:
                st.dataframe(
                    ev,
                    hide_index=True,
                    width="stretch",
                    column_config={"time": st.column_config.DatetimeColumn("time (UTC)")},
                )
        with common.section("the requeues and restarts"):
            rs = data(queries.restarts, runs)
            st.subheader("Requeues and restarts")
            if rs.empty:
                st.caption("None.")
            else:
                st.dataframe(
                    rs,
                    hide_index=True,
                    width="stretch",
                    column_config={"time": st.column_config.DatetimeColumn("time (UTC)")},
                )


curves()
