"""The ESM3 suite's dashboard: `streamlit run dashboard/app.py -- --workspace PATH`.

Pages live in `dashboard/views/` (not `pages/`, which Streamlit would also auto-list); this script sets up the navigation and the sidebar
that every page shares (workspace, auto-refresh).
"""

from __future__ import annotations

import sys
from pathlib import Path

# `streamlit run` puts this folder, not the repository, on sys.path
_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import streamlit as st  # noqa: E402

from dashboard import common  # noqa: E402

st.set_page_config(page_title="ESM3 training suite", page_icon=":material/biotech:", layout="wide")

PAGES = [
    st.Page("views/overview.py", title="Overview", icon=":material/dashboard:", default=True),
    st.Page("views/tokens.py", title="Token counts", icon=":material/database:", url_path="tokens"),
    st.Page("views/loss.py", title="Loss", icon=":material/show_chart:", url_path="loss"),
    st.Page(
        "views/stability.py",
        title="Stability",
        icon=":material/monitor_heart:",
        url_path="stability",
    ),
    st.Page("views/jobs.py", title="Jobs", icon=":material/lan:", url_path="jobs"),
    st.Page("views/sql.py", title="SQL", icon=":material/terminal:", url_path="sql"),
]
page = st.navigation(PAGES)

ws = common.workspace()
with st.sidebar:
    st.caption(f"Workspace  \n`{ws}`")
    choices = list(common.REFRESH_CHOICES)
    wanted = st.query_params.get("refresh")
    if wanted is not None and "refresh_s" not in st.session_state:
        try:
            st.session_state["refresh_s"] = max(0, int(float(wanted)))
        except ValueError:
            pass
    current = st.session_state.get("refresh_s", common.REFRESH_CHOICES[common.DEFAULT_REFRESH])
    labels = {v: k for k, v in common.REFRESH_CHOICES.items()}
    if current not in labels:
        choices.append(f"{current} s")
        labels[current] = f"{current} s"
    label = st.selectbox(
        "Auto-refresh",
        choices,
        index=choices.index(labels[current]),
        key="refresh_label",
        help="How often live sections re-read the lake. Readers take no lock: writers never wait.",
    )
    st.session_state["refresh_s"] = common.REFRESH_CHOICES.get(label, current)

page.run()
