"""Every dashboard page under Streamlit's AppTest, on workspaces written by the lake's
writers: the pages show the numbers that were written, empty workspaces get an empty
state, bad SQL is refused, a corrupt file is named while the rest renders, and new
steps show up on the next run without a restart."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

from dashboard import demo_data  # noqa: E402
from esm3.metrics.lake import LakeWriter, ensure_lake  # noqa: E402

APP = str(Path(__file__).resolve().parents[1] / "dashboard" / "app.py")
STEPS = 300
PAGES = {
    "overview": None,
    "tokens": "views/tokens.py",
    "loss": "views/loss.py",
    "stability": "views/stability.py",
    "jobs": "views/jobs.py",
    "sql": "views/sql.py",
}
TITLES = {
    "overview": "Overview",
    "tokens": "Token counts",
    "loss": "Loss",
    "stability": "Stability",
    "jobs": "Jobs",
    "sql": "SQL",
}


@pytest.fixture(scope="module")
def seeded(tmp_path_factory) -> tuple[Path, dict[str, demo_data.SimRun]]:
    ws = tmp_path_factory.mktemp("dash") / "ws"
    return ws, demo_data.seed(ws, steps=STEPS)


def open_page(ws: Path, page: str, monkeypatch) -> AppTest:
    monkeypatch.setenv("ESM3_WORKSPACE", str(ws))
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    if PAGES[page]:
        at.switch_page(PAGES[page]).run()
    return at


def metrics(at: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def assert_clean(at: AppTest, page: str) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    assert [t.value for t in at.title] == [TITLES[page]]


def charts(at: AppTest) -> list[tuple[dict, list[pa.Table]]]:
    """(Vega-Lite spec, its datasets as Arrow tables) of every chart on the page."""
    out = []
    for el in at.get("vega_lite_chart"):
        p = el.proto
        tables = [pa.ipc.open_stream(d.data.data).read_all() for d in p.datasets]
        if p.data.data:
            tables.append(pa.ipc.open_stream(p.data.data).read_all())
        out.append((json.loads(p.spec), tables))
    return out


def test_overview(seeded, monkeypatch):
    ws, sims = seeded
    at = open_page(ws, "overview", monkeypatch)
    assert_clean(at, "overview")
    m = metrics(at)
    assert (m["Runs"], m["Running"], m["Failed jobs"]) == ("3", "1", "1")
    last_steps = [x.value for x in at.metric if x.label == "Last step"]
    last_losses = [x.value for x in at.metric if x.label == "Last loss"]
    assert sorted(last_steps) == sorted(f"{s.last_step:,}" for s in sims.values())
    assert sorted(last_losses) == sorted(f"{s.last_loss:.3f}" for s in sims.values())
    runs = at.dataframe[0].value.set_index("run_id")
    assert runs.loc["train-a", "progress"] == pytest.approx(0.5)
    assert runs.loc["prep-seq-01", "status"] == "FAILED"
    alerts = at.dataframe[1].value
    assert set(alerts["source"]) == {"spike", "nonfinite", "skip", "rollback", "job"}


def test_token_counts(seeded, monkeypatch):
    ws, sims = seeded
    at = open_page(ws, "tokens", monkeypatch)
    assert_clean(at, "tokens")
    m = metrics(at)
    assert m["Datasets"] == "8" and m["Tokens"] == "612.2B"  # Table S3's token column
    assert m["sequence tokens (unique)"] == "484.4B"  # Table S4, paper: 484,441M
    assert m["annotation tokens (unique)"] == "106B"
    s3 = at.dataframe[0].value.set_index("dataset")
    assert s3.loc["UniRef", "tokens_b"] == pytest.approx(54.6)
    assert s3.loc["MGnify", "expansion"] == "90% (621M)"
    # the run picked by default is the most recently active one
    run = at.selectbox(key="tokens_run").value
    seen = at.dataframe[2].value.set_index("dataset")
    for ds, n in sims[run].tokens_by_dataset.items():
        assert seen.loc[ds, "tokens_seen"] == pytest.approx(n / 1e9)
    assert seen.loc["PDB", "epochs"] == pytest.approx(sims[run].tokens_by_dataset["PDB"] / 54e6)
    # expected unique never exceeds what was drawn
    assert (seen["unique_tokens"] <= seen["tokens_seen"] * (1 + 1e-9)).all()
    assert len(charts(at)) == 4


def test_loss(seeded, monkeypatch):
    ws, sims = seeded
    at = open_page(ws, "loss", monkeypatch)
    assert_clean(at, "loss")
    m = metrics(at)
    for rid, sim in sims.items():
        assert m[f"{rid} · loss at step {sim.last_step:,}"] == f"{sim.last_loss:.3f}"
    ((spec, tables),) = charts(at)
    assert spec["facet"]["field"] == "track"
    data = tables[0].to_pandas()
    curve = data[(data["layer"] == "curve") & (data["track"] == "sequence")]
    # 300 steps fit in the 2,000-point budget: one point per step per run, latest attempt
    assert (curve["run_id"] == "train-a").sum() == STEPS
    stage = data[(data["layer"] == "stage") & (data["run_id"] == "train-a")]
    assert set(stage["step"]) == {sims["train-a"].stage_step}
    assert (data["layer"] == "validation").any()
    # toggles re-render: log scale, smoothing off gives the raw bucket means back
    at.toggle(key="loss_log").set_value(True)
    at.slider(key="loss_smoothing").set_value(0.0)
    at.run()
    assert_clean(at, "loss")
    ((spec, tables),) = charts(at)
    assert '"type": "log"' in json.dumps(spec)
    d = tables[0].to_pandas()
    c = d[d["layer"] == "curve"].dropna(subset=["raw"])
    assert (c["smoothed"] - c["raw"]).abs().max() < 1e-9


def test_loss_downsamples_long_runs(seeded, monkeypatch):
    ws, _ = seeded
    at = open_page(ws, "loss", monkeypatch)
    at.sidebar.select_slider(key="loss_points").set_value(250)
    at.run()
    ((_, tables),) = charts(at)
    d = tables[0].to_pandas()
    per_run = d[(d["layer"] == "curve") & (d["track"] == "sequence")].groupby("run_id").size()
    assert (per_run <= 250).all() and (per_run >= 125).all()


def test_stability(seeded, monkeypatch):
    ws, sims = seeded
    at = open_page(ws, "stability", monkeypatch)
    assert_clean(at, "stability")
    m = metrics(at)
    n = len(sims)  # two runs selected by default, one of each event per run
    assert (m["Spikes"], m["Non-finite steps"], m["Skipped steps"]) == (str(n),) * 3
    assert (m["Rollbacks"], m["Requeues"]) == (str(n), str(n))
    got = charts(at)
    assert len(got) == 6
    spec, tables = got[0]  # gradient norm: the clip threshold from the run's config
    thresholds = [t.to_pandas() for t in tables if "y" in t.column_names]
    assert thresholds and thresholds[0]["y"].tolist() == [1.0]
    marked = [t.to_pandas() for t in tables if "kind" in t.column_names][0]
    assert {"spike", "rollback", "nonfinite"} <= set(marked["kind"])
    events = at.dataframe[0].value
    assert len(events) == 5 * n


def test_jobs(seeded, monkeypatch):
    ws, _ = seeded
    at = open_page(ws, "jobs", monkeypatch)
    assert_clean(at, "jobs")
    m = metrics(at)
    assert (m["Tasks"], m["Failed"], m["Running"]) == ("12", "1", "2")
    assert m["Records refused"] == "12"
    codes = [c.value for c in at.code]
    assert any("mmseqs easy-linclust exited 137" in c for c in codes)
    rej = at.dataframe[-1].value.set_index("reason")["records"].to_dict()
    assert rej == {"too_short": 7, "invalid_residue": 3, "duplicate_id": 2}


def test_sql_runs_and_refuses(seeded, monkeypatch):
    ws, _ = seeded
    at = open_page(ws, "sql", monkeypatch)
    assert_clean(at, "sql")
    assert len(at.dataframe[0].value) == 3  # the first example: all runs
    assert at.get("download_button")
    for sql, says in [
        ("DROP VIEW runs", "refused: DROP statements are not allowed"),
        ("INSERT INTO runs (run_id) VALUES ('x')", "refused: INSERT"),
        ("ATTACH 'x.duckdb'", "refused: ATTACH"),
        ("COPY runs TO 'x.csv'", "refused: COPY"),
        ("SELECT * FROM read_csv('http://example.com/x.csv')", "external access"),
    ]:
        at.text_area(key="sql_text").input(sql)
        at.button[0].click()
        at.run()
        assert not at.exception
        assert len(at.error) == 1 and says in at.error[0].value, sql
        assert not at.dataframe
    at.text_area(key="sql_text").input("SELECT nosuch FROM runs")
    at.button[0].click()
    at.run()
    assert "DuckDB could not run the query" in at.error[0].value
    at.text_area(key="sql_text").input("SELECT count(*) AS n FROM train_steps")
    at.button[0].click()
    at.run()
    assert at.dataframe[0].value["n"].item() == STEPS + STEPS + 100


@pytest.mark.parametrize("page", list(PAGES))
def test_no_workspace_shows_an_empty_state(tmp_path, monkeypatch, page):
    ws = tmp_path / "not-yet"
    at = open_page(ws, page, monkeypatch)
    assert not at.exception and not at.error
    if page != "sql":
        assert any("No metrics yet" in i.value for i in at.info)
    assert not ws.exists()


@pytest.mark.parametrize(
    ("page", "says"),
    [
        ("overview", "No runs yet"),
        ("tokens", "No dataset statistics yet"),
        ("loss", "No training steps yet"),
        ("stability", "No training steps yet"),
        ("jobs", "No jobs yet"),
    ],
)
def test_empty_lake_shows_an_empty_state(tmp_path, monkeypatch, page, says):
    ensure_lake(tmp_path)
    at = open_page(tmp_path, page, monkeypatch)
    assert not at.exception and not at.error
    assert any(says in i.value for i in at.info), [i.value for i in at.info]


@pytest.mark.parametrize("page", ["overview", "loss", "stability", "tokens"])
def test_corrupt_file_is_reported_and_the_rest_renders(seeded, tmp_path, monkeypatch, page):
    src, sims = seeded
    ws = tmp_path / "ws"
    shutil.copytree(src, ws)
    files = sorted((ws / "lake" / "train_steps" / "run_id=train-b").glob("part-*.parquet"))
    bad = files[0]
    bad.write_bytes(bad.read_bytes()[:100])
    at = open_page(ws, page, monkeypatch)
    assert not at.exception and not at.error
    warnings = [w.value for w in at.warning]
    assert any(str(bad.relative_to(ws)) in w and "corrupt" in w for w in warnings), warnings
    assert at.metric  # the figures are still there
    if page == "overview":
        assert f"{sims['train-a'].last_step:,}" in [m.value for m in at.metric]


def test_new_steps_show_without_a_restart(seeded, tmp_path, monkeypatch):
    src, sims = seeded
    ws = tmp_path / "ws"
    shutil.copytree(src, ws)
    at = open_page(ws, "overview", monkeypatch)
    sim = sims["train-a"]
    assert f"{sim.last_step:,}" in [m.value for m in at.metric if m.label == "Last step"]
    rng = np.random.default_rng(7)
    new_last = sim.last_step + 25
    with LakeWriter(ws, "train_steps", flush_rows=10, background=False) as w:
        for step in range(sim.last_step + 1, new_last + 1):
            w.add(demo_data.step_row("train-a", step, 1, STEPS, rng, False))
    at.run()  # what a fragment's run_every tick does
    assert f"{new_last:,}" in [m.value for m in at.metric if m.label == "Last step"]
    part = "lake/train_steps/run_id=train-a"
    new = {p.name for p in (ws / part).glob("*.parquet")} - {
        p.name for p in (src / part).glob("*.parquet")
    }
    assert sum(pq.read_metadata(ws / part / n).num_rows for n in new) == 25


def test_jobs_lists_training_failures_without_an_array_index(tmp_path, monkeypatch):
    """A training job is no array task: its array_index is null (pd.NA on the page), and a
    LOST job may have no node and no end time either."""
    from esm3.metrics.lake import now, write_rows

    base = dict(run_id="train-x", stage="train", attempt=0, node="nodeA", cluster="local")
    rows = [
        dict(base, job_id="70", rank=0, state="COMPLETED", ended_at=now()),
        dict(base, job_id="71", rank=0, state="FAILED", exit_code=1, error="loss is NaN"),
        dict(base, job_id="72", rank=1, state="LOST", error="node went away", node=None),
        dict(base, job_id="73", array_index=4, rank=0, state="FAILED", error="oom"),
    ]
    write_rows(tmp_path, "jobs", rows)
    at = open_page(tmp_path, "jobs", monkeypatch)
    assert_clean(at, "jobs")
    assert metrics(at)["Failed"] == "3"
    labels = [e.label for e in at.expander]
    assert any("FAILED" in lb and "job 71" in lb and "rank 0" in lb for lb in labels), labels
    assert any("LOST" in lb and "job 72" in lb and "rank 1" in lb for lb in labels), labels
    assert any("job 73" in lb and "array task 4" in lb for lb in labels), labels
    codes = [c.value for c in at.code]
    assert "loss is NaN" in codes and "node went away" in codes


def test_loss_shows_a_models_own_metrics(tmp_path, monkeypatch):
    """A run that reports per-step values of its own (the structure tokenizer's
    `train_steps.metrics`) gets a chart of them, one facet per value."""
    from datetime import UTC, datetime

    from esm3.metrics.lake import write_rows

    ws = tmp_path / "ws"
    sims = demo_data.seed(ws, steps=20)
    run = sorted(sims)[0]
    rows = [dict(run_id=run, step=s, attempt=9, stage="s", loss=1.0, time=datetime.now(UTC),
                 metrics=json.dumps({"perplexity": 10.0 + s, "codes_used": 20.0}))
            for s in range(1, 21)]  # fmt: skip
    write_rows(ws, "train_steps", rows)
    at = open_page(ws, "loss", monkeypatch)
    assert_clean(at, "loss")
    ((loss_spec, _), (spec, tables)) = charts(at)
    assert loss_spec["facet"]["field"] == "track" and spec["facet"]["field"] == "metric"
    d = tables[0].to_pandas()
    assert set(d["metric"]) == {"perplexity", "codes_used"} and set(d["run_id"]) == {run}
    ppl = d[d["metric"] == "perplexity"].sort_values("step")
    assert ppl["value"].tolist() == [10.0 + s for s in range(1, 21)]
