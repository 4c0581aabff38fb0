"""SQL: read-only queries over the catalog's views, with saved examples and CSV download.
Statements other than queries, and reads outside the lake, are refused."""

from __future__ import annotations

import duckdb
import streamlit as st

from dashboard import common
from esm3.metrics import queries
from esm3.metrics.schema import TABLES

st.title("SQL")
ws = common.workspace()
MAX_ROWS = 10_000

st.caption(
    "Read-only SQL over the catalog (DuckDB). Views: "
    + ", ".join(f"`{t}`" for t in TABLES)
    + ", plus `jobs_history`, `runs_history`, `train_steps_all`, `rejects_all`, "
    "`validation` (per dataset and loss column, from the validation events), "
    "`dataset_stats_all`, `token_stats_all`. Writes, ATTACH, COPY, SET "
    "and reads outside the workspace's lake are refused."
)

names = list(queries.EXAMPLE_QUERIES)


def _load_example() -> None:
    st.session_state["sql_text"] = queries.EXAMPLE_QUERIES[st.session_state["sql_example"]]


st.selectbox("Saved example queries", names, key="sql_example", on_change=_load_example)
if "sql_text" not in st.session_state:
    st.session_state["sql_text"] = queries.EXAMPLE_QUERIES[names[0]]
with st.form("sql_form"):
    sql = st.text_area("Query", key="sql_text", height=160)
    st.form_submit_button("Run", type="primary", icon=":material/play_arrow:")

# the query runs on load too (the form only changes it on submit), so the page opens with
# the first example's result
if sql.strip():
    if not queries.lake_exists(ws):
        common.no_lake(ws)
    else:
        reader = queries.LakeReader(ws)
        try:
            common.test_delay()
            df, truncated = queries.run_user_sql(reader, sql, max_rows=MAX_ROWS)
        except queries.SqlRefused as e:
            st.error(str(e), icon=":material/block:")
        except duckdb.Error as e:
            st.error(f"DuckDB could not run the query: {e}", icon=":material/error:")
        else:
            st.caption(
                f"{len(df):,} row{'s' if len(df) != 1 else ''}"
                + (f" (first {MAX_ROWS:,} shown)" if truncated else "")
            )
            st.dataframe(df, hide_index=True, width="stretch")
            st.download_button(
                "Download CSV",
                df.to_csv(index=False).encode(),
                file_name="esm3-query.csv",
                mime="text/csv",
                icon=":material/download:",
            )
        finally:
            common.report_bad_files(reader.bad_files)
            reader.close()

with st.expander("Columns of each table"):
    for name, schema in TABLES.items():
        st.markdown(f"**{name}**: " + ", ".join(f"`{f.name}` {f.type}" for f in schema))
