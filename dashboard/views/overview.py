"""Overview: every run with its status, progress against the token budget, last step and
loss, and alerts (spikes, non-finite steps, failed jobs)."""

from __future__ import annotations

import streamlit as st

from dashboard import common
from esm3.metrics import queries

st.title("Overview")
ws = common.workspace()


@st.fragment(run_every=common.run_every())
def live() -> None:
    with common.Data(ws) as data:
        if not data.exists:
            common.no_lake(ws)
            return
        with common.section("runs"):
            runs = data(queries.runs_overview)
            if runs.empty:
                common.empty(
                    "runs",
                    "Runs appear here as soon as a job records itself in the lake "
                    "(`esm3 demo`, `make submit-preprocess`, `make submit-train`).",
                )
                return
            running = int((runs["status"] == "RUNNING").sum())
            failed_jobs = int(runs["failed_jobs"].sum())
            n_alerts = int((runs["alerts"] != "").sum())
            c = st.columns(4)
            c[0].metric("Runs", len(runs), border=True)
            c[1].metric("Running", running, border=True)
            c[2].metric("Failed jobs", failed_jobs, border=True)
            c[3].metric("Runs with alerts", n_alerts, border=True)

            train = runs[runs["last_step"].notna()].head(4)
            if not train.empty:
                st.subheader("Training runs")
                cols = st.columns(len(train))
                for col, row in zip(cols, train.itertuples(), strict=True):
                    with col.container(border=True):
                        st.markdown(f"**{row.run_id}** · {row.status}")
                        a, b = st.columns(2)
                        a.metric("Last step", common.fmt_int(row.last_step))
                        b.metric("Last loss", common.fmt_float(row.last_loss))
                        if row.progress is not None and row.progress == row.progress:
                            frac = float(min(1.0, max(0.0, row.progress)))
                            st.progress(
                                frac,
                                text=f"{common.fmt_tokens(row.tokens_seen)} of "
                                f"{common.fmt_tokens(row.token_budget)} tokens ({frac:.0%})",
                            )
                        if row.alerts:
                            st.caption(f":material/warning: {row.alerts}")

            st.subheader("All runs")
            st.dataframe(
                runs[
                    [
                        "run_id",
                        "kind",
                        "status",
                        "nodes",
                        "world_size",
                        "progress",
                        "last_step",
                        "last_loss",
                        "tokens_seen",
                        "token_budget",
                        "alerts",
                        "cluster",
                        "started_at",
                        "finished_at",
                    ]
                ],
                hide_index=True,
                width="stretch",
                column_config={
                    "run_id": st.column_config.TextColumn("run"),
                    "world_size": st.column_config.NumberColumn("ranks"),
                    "progress": st.column_config.ProgressColumn(
                        "progress (tokens / budget)",
                        min_value=0.0,
                        max_value=1.0,
                        format="percent",
                    ),
                    "last_step": st.column_config.NumberColumn("last step", format="%d"),
                    "last_loss": st.column_config.NumberColumn(
                        "last loss (nats/token)", format="%.4f"
                    ),
                    "tokens_seen": st.column_config.NumberColumn("tokens seen", format="compact"),
                    "token_budget": st.column_config.NumberColumn("budget", format="compact"),
                    "started_at": st.column_config.DatetimeColumn("started (UTC)"),
                    "finished_at": st.column_config.DatetimeColumn("finished (UTC)"),
                },
            )
        with common.section("alerts"):
            al = data(queries.alerts)
            st.subheader("Alerts")
            if al.empty:
                st.success("No spikes, non-finite steps or failed jobs.", icon=":material/check:")
            else:
                st.dataframe(
                    al,
                    hide_index=True,
                    width="stretch",
                    column_config={"time": st.column_config.DatetimeColumn("time (UTC)")},
                )


live()
