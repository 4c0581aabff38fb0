"""Jobs: preprocessing arrays and training jobs, the state of every task, failures with
their error text, and the input records the stages refused, by reason."""

from __future__ import annotations

from typing import Any

import pandas as pd
import streamlit as st

from dashboard import charts, common
from esm3.metrics import queries

st.title("Jobs")
ws = common.workspace()


def _text(value: object) -> str:
    """A cell as text; a missing value (None, NaN, pd.NA, NaT) as a dash, like fmt_int."""
    return "–" if pd.isna(value) else str(value)


def _where(row: Any) -> str:
    """An array task by its index; a training job (no array index) by its rank.

    The columns are nullable: a missing value is pd.NA, which has no truth value.
    """
    if not pd.isna(row.array_index):
        return f"array task {int(row.array_index)}"
    return f"rank {common.fmt_int(row.rank)}"


@st.fragment(run_every=common.run_every())
def live() -> None:
    with common.Data(ws) as data:
        if not data.exists:
            common.no_lake(ws)
            return
        with common.section("the job states"):
            counts = data(queries.job_state_counts)
            if counts.empty:
                common.empty(
                    "jobs",
                    "Every job and array task records its lifecycle here once submitted "
                    "(`make submit-preprocess`, `make submit-train`).",
                )
            else:
                total = counts.groupby("state")["tasks"].sum()
                k = st.columns(5)
                k[0].metric("Tasks", int(total.sum()), border=True)
                k[1].metric("Running", int(total.get("RUNNING", 0)), border=True)
                k[2].metric("Completed", int(total.get("COMPLETED", 0)), border=True)
                failed = sum(int(total.get(s, 0)) for s in queries.FAILED_STATES)
                k[3].metric("Failed", failed, border=True)
                k[4].metric("Cancelled", int(total.get("CANCELLED", 0)), border=True)
                st.altair_chart(charts.state_bars(counts), width="stretch")
        with common.section("the failures"):
            fail = data(queries.failures)
            st.subheader("Failures")
            if fail.empty:
                st.success("No failed task.", icon=":material/check:")
            else:
                for row in fail.head(5).itertuples():
                    with st.expander(
                        f":red[{row.state}] {row.run_id} · {row.stage} · job {row.job_id} · "
                        f"{_where(row)} · attempt {common.fmt_int(row.attempt)} · "
                        f"exit {common.fmt_int(row.exit_code)}",
                        expanded=row.Index == 0,
                    ):
                        st.code(row.error or "(no error text recorded)", language=None)
                        st.caption(f"node {_text(row.node)} · ended {_text(row.ended_at)}")
                if len(fail) > 5:
                    st.dataframe(fail, hide_index=True, width="stretch")
        with common.section("the tasks"):
            st.subheader("Tasks (latest attempt)")
            tasks = data(queries.job_tasks)
            if tasks.empty:
                st.caption("None.")
            else:
                st.dataframe(
                    tasks,
                    hide_index=True,
                    width="stretch",
                    column_config={
                        "error": st.column_config.TextColumn("error", width="large"),
                        "started_at": st.column_config.DatetimeColumn("started (UTC)"),
                        "ended_at": st.column_config.DatetimeColumn("ended (UTC)"),
                        "updated_at": st.column_config.DatetimeColumn("updated (UTC)"),
                    },
                )
        with common.section("the rejected records"):
            st.subheader("Rejected input records")
            rej = data(queries.rejects_by_reason)
            if rej.empty:
                st.caption("No stage has refused a record.")
            else:
                st.metric("Records refused", f"{int(rej['records'].sum()):,}")
                left, right = st.columns([2, 3])
                left.altair_chart(charts.reject_bars(rej), width="stretch")
                right.dataframe(rej, hide_index=True, width="stretch")


live()
