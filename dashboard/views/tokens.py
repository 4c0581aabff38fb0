"""Token counts: Table S3 (datasets) and Table S4 (unique samples and tokens), and how many
tokens a run has drawn from each dataset against the expected number of unique ones."""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from dashboard import charts, common
from esm3.metrics import queries

st.title("Token counts")
ws = common.workspace()


def table_s3(data: common.Data) -> pd.DataFrame:
    s3 = data(queries.dataset_table)
    st.subheader("Pre-training datasets (Table S3)")
    if s3.empty:
        common.empty(
            "dataset statistics",
            "`esm3 preprocess tokens` writes one row per dataset to `dataset_stats`.",
        )
        return s3
    c = st.columns(3)
    c[0].metric("Datasets", len(s3), border=True)
    c[1].metric("Sequences", common.fmt_tokens(s3["sequences"].sum()), border=True)
    c[2].metric("Tokens", common.fmt_tokens(s3["tokens"].sum()), border=True)
    view = s3.assign(
        clustering=[
            _level(lv, n)
            for lv, n in zip(s3["clustering_level"], s3["clustering_count"], strict=True)
        ],
        expansion=[
            _level(lv, n)
            for lv, n in zip(s3["expansion_level"], s3["expansion_count"], strict=True)
        ],
        tokens_b=s3["tokens"] / 1e9,
    )
    st.dataframe(
        view[
            [
                "dataset",
                "type",
                "clustering",
                "expansion",
                "sequences",
                "avg_length",
                "tokens_b",
                "release",
            ]
        ],
        hide_index=True,
        width="stretch",
        column_config={
            "clustering": st.column_config.TextColumn("clustering level (clusters)"),
            "expansion": st.column_config.TextColumn("expansion level (members)"),
            "sequences": st.column_config.NumberColumn("samples", format="compact"),
            "avg_length": st.column_config.NumberColumn("avg length (residues)", format="%.0f"),
            "tokens_b": st.column_config.NumberColumn("tokens (B)", format="%.3f"),
        },
    )
    st.altair_chart(
        charts.type_bars(view, "tokens_b", "Tokens per dataset", "tokens (billions)"),
        width="stretch",
    )
    return s3


def _level(level, count) -> str:
    lv = "–" if level is None or pd.isna(level) else f"{float(level):.0%}"
    n = "" if count is None or pd.isna(count) else f" ({common.fmt_tokens(count)})"
    return lv + n


def table_s4(data: common.Data) -> None:
    s4 = data(queries.token_table)
    st.subheader("Unique training tokens (Table S4)")
    if s4.empty:
        common.empty("unique-token statistics", "`esm3 preprocess tokens` fills `token_stats`.")
        return
    by_type = s4.groupby("type", sort=False)[["unique_samples", "unique_tokens"]].sum()
    cols = st.columns(len(by_type) + 1)
    for col, (typ, row) in zip(cols, by_type.iterrows(), strict=False):
        col.metric(
            f"{typ} tokens (unique)",
            common.fmt_tokens(row["unique_tokens"]),
            border=True,
            help=f"{common.fmt_tokens(row['unique_samples'])} unique samples",
        )
    cols[-1].metric("all unique tokens", common.fmt_tokens(s4["unique_tokens"].sum()), border=True)
    view = s4.assign(samples_m=s4["unique_samples"] / 1e6, tokens_m=s4["unique_tokens"] / 1e6)
    shown = ["dataset", "type", "samples_m", "tokens_m", "repeats", "token_budget"]
    st.dataframe(
        view[[c for c in shown if view[c].notna().any() or c in ("dataset", "type")]],
        hide_index=True,
        width="stretch",
        column_config={
            "samples_m": st.column_config.NumberColumn("unique samples (M)", format="%,.1f"),
            "tokens_m": st.column_config.NumberColumn("unique tokens (M)", format="%,.0f"),
            "repeats": st.column_config.NumberColumn("dataset repeats", format="%.2f"),
            "token_budget": st.column_config.NumberColumn("token budget", format="compact"),
        },
    )
    st.altair_chart(
        charts.type_bars(view, "tokens_m", "Unique tokens per dataset", "unique tokens (millions)"),
        width="stretch",
    )


@st.fragment(run_every=common.run_every())
def seen(s3: pd.DataFrame) -> None:
    with common.Data(ws, report=False) as data, common.section("tokens seen"):
        _seen(data, s3)


def _seen(data: common.Data, s3: pd.DataFrame) -> None:
    st.subheader("Tokens seen by a run")
    runs = data(queries.run_ids_with_steps)
    if not runs:
        common.empty("training steps", "A training run logs `tokens_by_dataset` every step.")
        return
    run = st.selectbox("Run", runs, key="tokens_run")
    ts = data(queries.tokens_seen, [run])
    if ts.empty:
        common.empty(
            "per-dataset token counts for this run", "Its steps carry no `tokens_by_dataset`."
        )
        return
    sizes = s3.set_index("dataset") if not s3.empty else pd.DataFrame()
    rows, curves = [], []
    for rec in ts.itertuples():
        size = sizes["tokens"].get(rec.dataset) if not sizes.empty else None
        n = sizes["sequences"].get(rec.dataset) if not sizes.empty else None
        uniq = np.nan
        if size and n:
            avg_len = float(size) / float(n)
            uniq = float(avg_len * queries.expected_unique(float(n), rec.tokens_seen / avg_len))
            c = queries.expected_unique_curve(float(size), float(n), rec.tokens_seen, log=True)
            curves.append(c.assign(dataset=rec.dataset))
        rows.append(
            {
                "dataset": rec.dataset,
                "tokens_seen": rec.tokens_seen / 1e9,
                "dataset_tokens": float(size) / 1e9 if size else np.nan,
                "epochs": rec.tokens_seen / float(size) if size else np.nan,
                "unique_tokens": uniq / 1e9,
            }
        )
    table = pd.DataFrame(rows).sort_values("tokens_seen", ascending=False)
    step = int(ts["step"].iloc[0])
    st.caption(
        f"At step {step:,}, run **{run}** has drawn {common.fmt_tokens(ts['tokens_seen'].sum())} "
        "tokens. Drawing k samples with replacement from n leaves n(1 - (1 - 1/n)^k) of them "
        "unique in expectation; samples are taken as the dataset's tokens / its sample count."
    )
    left, right = st.columns(2)
    left.altair_chart(charts.seen_bars(table), width="stretch")
    if curves:
        cv = pd.concat(curves)
        cv = cv.assign(
            tokens_drawn=cv["tokens_drawn"] / 1e9, unique_tokens=cv["unique_tokens"] / 1e9
        )
        pts = table.dropna(subset=["unique_tokens"])
        right.altair_chart(charts.seen_vs_unique(cv, pts), width="stretch")
    else:
        right.info("Dataset sizes (Table S3) are needed for the expected-unique curves.")
    st.dataframe(
        table,
        hide_index=True,
        width="stretch",
        column_config={
            "tokens_seen": st.column_config.NumberColumn("tokens seen (B)", format="%.4f"),
            "dataset_tokens": st.column_config.NumberColumn("dataset tokens (B)", format="%.3f"),
            "epochs": st.column_config.NumberColumn("epochs", format="%.5f"),
            "unique_tokens": st.column_config.NumberColumn(
                "expected unique tokens (B)", format="%.4f"
            ),
        },
    )


with common.Data(ws) as data:
    if not data.exists:
        common.no_lake(ws)
    else:
        s3 = pd.DataFrame()
        with common.section("Table S3"):
            s3 = table_s3(data)
        with common.section("Table S4"):
            table_s4(data)
if data.exists:
    seen(s3)
