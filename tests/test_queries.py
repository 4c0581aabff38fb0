"""The queries the dashboard and the CLI share, on workspaces written by the lake's writers."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dashboard import demo_data
from esm3.metrics import queries as Q
from esm3.metrics.lake import ensure_lake, write_rows

STEPS = 300


@pytest.fixture(scope="module")
def seeded(tmp_path_factory) -> tuple[Path, dict[str, demo_data.SimRun]]:
    ws = tmp_path_factory.mktemp("ws")
    sims = demo_data.seed(ws, steps=STEPS)
    return ws, sims


def _rows(ws: Path, table: str) -> list[dict]:
    """Every row the writers put in a table, read back with pyarrow (not through DuckDB)."""
    out = []
    for f in sorted((ws / "lake" / table).rglob("*.parquet")):
        out.extend(pq.read_table(f).to_pylist())
    return out


def _dedup_steps(ws: Path, run_id: str) -> dict[int, dict]:
    """step -> the row of its latest attempt: what `train_steps` promises, computed in Python."""
    best: dict[int, dict] = {}
    for r in _rows(ws, "train_steps"):
        if r["run_id"] == run_id and (
            r["step"] not in best or r["attempt"] > best[r["step"]]["attempt"]
        ):
            best[r["step"]] = r
    return best


def test_overview_matches_what_was_written(seeded):
    ws, sims = seeded
    with Q.LakeReader(ws) as r:
        df = Q.runs_overview(r).set_index("run_id")
    assert set(df.index) == {"train-a", "train-b", "prep-seq-01"}
    for rid, sim in sims.items():
        row = df.loc[rid]
        assert row["last_step"] == sim.last_step
        assert row["last_loss"] == pytest.approx(sim.last_loss)
        assert row["tokens_seen"] == sim.tokens_seen
        assert row["progress"] == pytest.approx(sim.tokens_seen / sim.token_budget)
        assert (row["spikes"], row["rollbacks"], row["nonfinite"], row["skipped"]) == (1, 1, 1, 1)
        assert "1 spike" in row["alerts"] and "1 rollback" in row["alerts"]
    assert df.loc["train-a", "status"] == "RUNNING"
    assert df.loc["train-b", "status"] == "COMPLETED"
    # the preprocessing array has a failed task: the catalog derives FAILED, the alert says so
    assert df.loc["prep-seq-01", "failed_jobs"] == 1
    assert df.loc["prep-seq-01", "alerts"] == "1 failed job"
    assert math.isnan(df.loc["prep-seq-01", "progress"])


def test_series_downsamples_in_sql_and_keeps_the_latest_attempt(seeded):
    ws, sims = seeded
    sim = sims["train-a"]
    truth = _dedup_steps(ws, "train-a")
    with Q.LakeReader(ws) as r:
        full = Q.series(r, ["train-a"], ["loss_sequence", "grad_norm"], max_points=10_000)
        small = Q.series(r, ["train-a"], ["loss_sequence", "grad_norm"], max_points=40)
    # one point per step when the budget allows, and each is the latest attempt's value
    assert len(full) == len(truth) == STEPS
    assert (full["width"] == 1).all()
    lo, back = sim.rollback[1], sim.rollback[0]
    for step in (lo, back, STEPS - 1):
        got = full.loc[full["step"] == step, "loss_sequence"].item()
        assert got == pytest.approx(truth[step]["loss_sequence"])
        assert truth[step]["attempt"] == 1
    # at most max_points buckets of equal width; each bucket's mean/min/max over its steps
    width = math.ceil(STEPS / 40)
    assert len(small) <= 40 and (small["width"] == width).all()
    assert small["n"].sum() == STEPS
    for b in small.itertuples():
        vals = [truth[s]["grad_norm"] for s in range(b.step, b.step + width) if s in truth]
        fin = [v for v in vals if math.isfinite(v)]
        assert b.n == len(vals)
        assert b.grad_norm == pytest.approx(np.mean(fin))
        assert (b.grad_norm_min, b.grad_norm_max) == pytest.approx((min(fin), max(fin)))
    # the non-finite step is counted, not averaged in
    assert small["nonfinite"].sum() == 1 and small["skipped"].sum() == 1
    clipped = sum(bool(r["clipped"]) for r in truth.values())
    assert (small["clipped_frac"] * small["n"]).sum() == pytest.approx(clipped)


def test_series_rejects_unknown_columns(seeded):
    ws, _ = seeded
    with Q.LakeReader(ws) as r, pytest.raises(KeyError, match="no column"):
        Q.series(r, ["train-a"], ["loss; DROP VIEW runs"])


def test_events_stages_validation_and_restarts(seeded):
    ws, sims = seeded
    sim = sims["train-a"]
    with Q.LakeReader(ws) as r:
        stages = Q.stage_boundaries(r, ["train-a"])
        ev = Q.step_events(r, ["train-a"])
        val = Q.validation_loss(r, ["train-a"])
        rs = Q.restarts(r, ["train-a"])
        clip = Q.clip_threshold(r, "train-a")
    assert stages["step"].tolist() == [sim.stage_step]
    assert ev.set_index("kind")["step"].to_dict() == {
        "spike": sim.spike_step,
        "nonfinite": sim.nonfinite_step,
        "skip": sim.nonfinite_step,
        "rollback": sim.rollback[0],
        "requeue": sim.rollback[0],
    }
    written = [e for e in _rows(ws, "events") if e["run_id"] == "train-a"]
    val_events = [e for e in written if e["kind"] == "validation"]
    assert sorted(val[val["track"] == "loss"]["step"]) == sorted(e["step"] for e in val_events)
    first = min(val_events, key=lambda e: e["step"])
    detail = json.loads(first["detail"])
    got = val[(val["step"] == first["step"]) & (val["track"] == "loss_ss8")]["value"].item()
    assert got == pytest.approx(detail["loss_ss8"])
    # two ranks were requeued (attempt 0 REQUEUED, attempt 1 started) plus the requeue event
    assert (rs["what"] == "requeue").sum() == 1
    assert rs["what"].str.contains("attempt 1").sum() == 2
    assert clip == 1.0


def test_jobs_failures_and_rejects(seeded):
    ws, _ = seeded
    with Q.LakeReader(ws) as r:
        counts = Q.job_state_counts(r)
        tasks = Q.job_tasks(r, "prep-seq-01")
        fail = Q.failures(r)
        rej = Q.rejects_by_reason(r)
    prep = counts[counts["run_id"] == "prep-seq-01"].set_index("state")["tasks"].to_dict()
    assert prep == {"COMPLETED": 7, "FAILED": 1}  # the requeued task completed on attempt 1
    assert len(tasks) == 8
    assert tasks.set_index("array_index").loc[3, "attempts"] == 2
    assert len(fail) == 1 and fail["exit_code"].item() == 137
    assert "out of memory" in fail["error"].item()
    assert rej.set_index("reason")["records"].to_dict() == {
        "too_short": 7,
        "invalid_residue": 3,
        "duplicate_id": 2,
    }


def test_token_tables_and_tokens_seen(seeded):
    ws, sims = seeded
    with Q.LakeReader(ws) as r:
        s3 = Q.dataset_table(r).set_index("dataset")
        s4 = Q.token_table(r)
        seen = Q.tokens_seen(r, ["train-b"])
    assert s3.loc["UniRef", "tokens"] == 54_600_000_000
    assert s3.loc["MGnify", "expansion_count"] == 621_000_000
    assert s3["tokens"].sum() == pytest.approx(612.181e9)  # Table S3's column
    by_type = s4.groupby("type")["unique_tokens"].sum()
    assert by_type["sequence"] == pytest.approx(484_420e6)  # paper: 484,441M (rounded rows)
    assert by_type["annotation"] == pytest.approx(105_957e6)
    assert dict(zip(seen["dataset"], seen["tokens_seen"], strict=True)) == pytest.approx(
        sims["train-b"].tokens_by_dataset
    )


def test_latest_dataset_stats_win(tmp_path):
    ensure_lake(tmp_path)
    row = {"run_id": "p", "dataset": "UniRef", "type": "sequence", "tokens": 1}
    write_rows(tmp_path, "dataset_stats", [row | {"computed_at": demo_data.T0}])
    write_rows(tmp_path, "dataset_stats", [row | {"tokens": 2}])
    with Q.LakeReader(tmp_path) as r:
        assert Q.dataset_table(r)["tokens"].tolist() == [2]


@pytest.mark.parametrize(
    ("n", "k"), [(1, 5), (10, 0), (10, 1), (10, 3), (1e6, 2.5e6), (2.029e9, 5e8)]
)
def test_expected_unique_closed_form(n, k):
    got = Q.expected_unique(n, k)
    want = n * (1 - (1 - 1 / n) ** k) if n < 1e5 else n * -math.expm1(k * math.log1p(-1 / n))
    assert got == pytest.approx(want, rel=1e-12)
    assert 0 <= got <= min(n, k) + 1e-9


def test_expected_unique_limits():
    # few draws from a huge set are all distinct; many draws exhaust a small set
    assert Q.expected_unique(1e12, 1000) == pytest.approx(1000, rel=1e-6)
    assert Q.expected_unique(50, 1e5) == pytest.approx(50)
    c = Q.expected_unique_curve(tokens=1e9, samples=1e6, seen=5e9, log=True)
    assert c["tokens_drawn"].max() == pytest.approx(6e9)
    assert np.all(np.diff(c["unique_tokens"]) >= 0) and c["unique_tokens"].max() < 1e9


def test_empty_lake_gives_empty_frames(tmp_path):
    ensure_lake(tmp_path)
    with Q.LakeReader(tmp_path) as r:
        assert Q.runs_overview(r).empty
        assert Q.run_ids_with_steps(r) == []
        assert Q.series(r, [], ["loss"]).empty
        assert Q.series(r, ["nope"], ["loss"]).empty
        assert Q.job_state_counts(r).empty and Q.failures(r).empty
        assert Q.rejects_by_reason(r).empty and Q.dataset_table(r).empty
        assert Q.tokens_seen(r, ["nope"]).empty and Q.alerts(r).empty


def test_missing_lake_is_not_created(tmp_path):
    ws = tmp_path / "nowhere"
    assert not Q.lake_exists(ws)
    with pytest.raises(FileNotFoundError, match="no lake at"):
        Q.LakeReader(ws).sql("SELECT 1")
    assert not ws.exists()  # a reader never creates the workspace


def test_signature_changes_when_a_file_lands(tmp_path):
    ensure_lake(tmp_path)
    before = Q.lake_signature(tmp_path)
    assert before == Q.lake_signature(tmp_path)
    write_rows(tmp_path, "events", [{"run_id": "r", "step": 1, "kind": "spike"}])
    assert Q.lake_signature(tmp_path) != before


@pytest.mark.parametrize(
    ("sql", "says"),
    [
        ("DROP VIEW runs", "DROP statements are not allowed"),
        ("INSERT INTO runs (run_id) VALUES ('x')", "INSERT statements are not allowed"),
        ("ATTACH 'other.duckdb' AS o", "ATTACH statements are not allowed"),
        ("COPY runs TO 'out.csv'", "COPY statements are not allowed"),
        ("SELECT 1; DROP VIEW runs", "DROP statements are not allowed"),
        ("SET enable_external_access = true", "SET statements are not allowed"),
        ("SELECT * FROM read_csv('http://example.com/x.csv')", "external access"),
        ("SELECT * FROM read_csv('/etc/passwd')", "external access"),
        ("SELECT * FROM glob('/etc/*')", "external access"),
    ],
)
def test_user_sql_refused(seeded, sql, says):
    ws, _ = seeded
    with Q.LakeReader(ws) as r, pytest.raises(Q.SqlRefused, match="refused") as e:
        Q.run_user_sql(r, sql)
    assert says in str(e.value)
    # the views are intact afterwards
    with Q.LakeReader(ws) as r:
        assert len(Q.run_user_sql(r, "SELECT * FROM runs")[0]) == 3


def test_user_sql_reads_and_truncates(seeded):
    ws, sims = seeded
    with Q.LakeReader(ws) as r:
        df, cut = Q.run_user_sql(r, Q.EXAMPLE_QUERIES["Last step and loss per run"])
        assert not cut
        assert dict(zip(df["run_id"], df["last_step"], strict=True)) == {
            k: v.last_step for k, v in sims.items()
        }
        df, cut = Q.run_user_sql(r, "SELECT * FROM train_steps", max_rows=10)
        assert cut and len(df) == 10
        for sql in Q.EXAMPLE_QUERIES.values():  # every saved example runs
            Q.run_user_sql(r, sql)


def _corrupt_data_pages(path: Path) -> None:
    """Overwrite a file's column data with garbage, keeping its footer (metadata) valid."""
    md = pq.read_metadata(path)
    col = md.row_group(0).column(1)  # `step`
    start = col.dictionary_page_offset or col.data_page_offset
    raw = bytearray(path.read_bytes())
    raw[start : start + col.total_compressed_size] = b"\xff" * col.total_compressed_size
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("how", ["truncated", "garbage_pages"])
def test_corrupt_file_is_skipped_and_named(seeded, tmp_path, how):
    src, _ = seeded
    ws = tmp_path / "ws"
    import shutil

    shutil.copytree(src, ws)
    files = sorted((ws / "lake" / "train_steps" / "run_id=train-a").glob("part-*.parquet"))
    bad = files[1]
    good_steps = sum(sum(pq.read_table(f, columns=["step"])["step"].to_pylist()) for f in files)
    good_steps -= sum(pq.read_table(bad, columns=["step"])["step"].to_pylist())
    if how == "truncated":
        bad.write_bytes(bad.read_bytes()[:200])
    else:
        _corrupt_data_pages(bad)
    with Q.LakeReader(ws) as r:
        # sum(step) decodes the pages (count(*) would only read the footers)
        rows = r.sql("SELECT sum(step) AS s FROM train_steps_all WHERE run_id = 'train-a'")
        assert rows["s"].item() == good_steps
        overview = Q.runs_overview(r)  # every other table still reads
        assert len(overview) == 3
        rel = str(bad.relative_to(ws))
        assert list(r.bad_files) == [rel]
        assert r.bad_files[rel]  # with the reason


def test_model_metrics_reads_the_json_column_bucketed(tmp_path):
    """A structure tokenizer run's per-step JSON values come back per metric, bucket means
    of the finite values; a run without them (ESM3) has none."""
    import json
    from datetime import UTC, datetime

    from esm3.metrics.lake import write_rows

    rows = []
    for step in range(1, 11):
        m = {"perplexity": float(step), "loss_distance": 10.0 - step, "codes_used": None}
        rows.append(dict(run_id="vq", step=step, attempt=0, stage="s", loss=1.0,
                         metrics=json.dumps(m), time=datetime.now(UTC)))  # fmt: skip
    rows.append(dict(run_id="esm", step=1, attempt=0, stage="s", loss=2.0, time=datetime.now(UTC)))
    write_rows(tmp_path, "train_steps", rows)
    with Q.LakeReader(tmp_path) as r:
        df = Q.model_metrics(r, ["vq", "esm"], max_points=5)
        none = Q.model_metrics(r, ["esm"])
    assert none.empty
    assert set(df["run_id"]) == {"vq"} and set(df["metric"]) == {"perplexity", "loss_distance",
                                                                 "codes_used"}  # fmt: skip
    ppl = df[df["metric"] == "perplexity"].sort_values("step")
    assert ppl["step"].tolist() == [1, 3, 5, 7, 9] and (ppl["width"] == 2).all()
    assert ppl["value"].tolist() == pytest.approx([1.5, 3.5, 5.5, 7.5, 9.5])
    assert df[df["metric"] == "codes_used"]["value"].isna().all()


# -- summaries written at compaction: the fast path answers as the plain queries ------------


def _step_rows(run_id: str, steps, attempt: int, seed: int, *, nan_at=(), skip_at=()) -> list:
    rng = np.random.default_rng(seed)
    out = []
    for s in steps:
        loss = float("nan") if s in nan_at else float(rng.normal(3, 0.1))
        out.append(
            {"run_id": run_id, "step": int(s), "attempt": attempt, "loss": loss}
            | {"tokens_seen": int((s + 1) * 100 + attempt), "skipped": s in skip_at}
            | {"tokens_by_dataset": json.dumps({"UniRef": (s + 1) * 60 + attempt, "PDB": s})}
        )
    return out


def _both(ws: Path):
    """(fast, plain) answers of the summary-backed queries, each from a cold process."""
    out = []
    for plain in (False, True):
        Q.clear_caches()
        ctx = Q.plain_queries() if plain else contextlib.nullcontext()
        with ctx, Q.LakeReader(ws) as r:
            ids = Q.run_ids_with_steps(r)
            out.append(
                (
                    Q.steps_by_run(r).drop(
                        columns=["tokens_by_dataset", "last_file"], errors="ignore"
                    ),
                    Q.runs_overview(r).drop(columns="alerts"),
                    ids,
                    Q.tokens_seen(r, ids),
                )
            )
    Q.clear_caches()
    return out


def _same(fast, plain) -> None:
    for a, b in zip(fast, plain, strict=True):
        if isinstance(a, list):
            assert a == b
            continue
        a = a.sort_values(list(a.columns[:2])).reset_index(drop=True)
        b = b.sort_values(list(b.columns[:2])).reset_index(drop=True)
        assert list(a.columns) == list(b.columns)
        pd.testing.assert_frame_equal(a, b, check_dtype=False)


def test_compaction_summaries_answer_as_the_raw_rows(tmp_path):
    """Runs compacted (with summaries), then a rollback that recomputes compacted steps and
    files flushed after the last compaction: the summary-backed queries give what the plain
    queries give over every raw row, and they do read the summaries."""
    from esm3.metrics.lake import compact
    from esm3.metrics.summaries import summary_path

    ws = tmp_path / "ws"
    ensure_lake(ws)
    for i in range(4):  # run a: 4 flushes of attempt 0, one with a NaN loss and a skip
        write_rows(
            ws,
            "train_steps",
            _step_rows("a", range(i * 50, i * 50 + 50), 0, i, nan_at={70}, skip_at={71}),
        )
    for i in range(3):  # run b: finished, compacted
        write_rows(ws, "train_steps", _step_rows("b", range(i * 40, i * 40 + 40), 0, 10 + i))
    write_rows(ws, "runs", [{"run_id": "a", "token_budget": 10**6}, {"run_id": "b"}])
    assert compact(ws, "train_steps", run_id="a", min_files=2) == 4
    assert compact(ws, "train_steps", run_id="b", min_files=2) == 3
    files = sorted((ws / "lake" / "train_steps").rglob("part-*.parquet"))
    assert len(files) == 2 and all(summary_path(ws, f).is_file() for f in files)
    _same(*_both(ws))

    # attempt 1 of run a recomputes steps 180..199 (compacted) and logs on: not compacted yet
    write_rows(ws, "train_steps", _step_rows("a", range(180, 230), 1, 99))
    write_rows(ws, "train_steps", _step_rows("a", range(230, 240), 1, 98, nan_at={235}))
    # a run with no compaction at all
    write_rows(ws, "train_steps", _step_rows("c", range(0, 7), 0, 5))
    fast, plain = _both(ws)
    _same(fast, plain)
    by = fast[0].set_index("run_id")
    assert by.loc["a", "rows"] == 200 + 60 and by.loc["a", "last_step"] == 239
    assert by.loc["a", "nonfinite_rows"] == 2 and by.loc["a", "skipped_rows"] == 1
    assert set(fast[3]["step"]) == {239, 119, 6}  # tokens seen at each run's last step
    seen = fast[3].set_index(["run_id", "dataset"])["tokens_seen"]
    assert seen[("a", "UniRef")] == 240 * 60 + 1

    # the summaries are what the fast path reads: a planted (wrong) one shows through ...
    s = summary_path(ws, files[0])
    t = pq.read_table(s)
    planted = t.set_column(t.schema.get_field_index("rows"), "rows", pa.array([1], pa.int64()))
    pq.write_table(planted, s)
    Q.clear_caches()
    with Q.LakeReader(ws) as r:
        rid = t.column("run_id")[0].as_py()
        assert (
            Q.steps_by_run(r).set_index("run_id").loc[rid, "rows"]
            != plain[0].set_index("run_id").loc[rid, "rows"]
        )
    # ... unless it was made from a file of another size, or cannot be read: rows decide
    wrong = planted.set_column(
        planted.schema.get_field_index("file_size"), "file_size", pa.array([1], pa.int64())
    )
    pq.write_table(wrong, s)
    _same(*_both(ws))
    s.write_bytes(b"not parquet")
    _same(*_both(ws))
    s.unlink()
    _same(*_both(ws))


def test_compaction_removes_the_merged_parts_summaries(tmp_path):
    from esm3.metrics.lake import compact
    from esm3.metrics.summaries import SUMMARY_DIR

    ws = tmp_path / "ws"
    ensure_lake(ws)
    for i in range(3):
        write_rows(ws, "train_steps", _step_rows("a", range(i * 10, i * 10 + 10), 0, i))
    compact(ws, "train_steps", run_id="a", min_files=2)
    write_rows(ws, "train_steps", _step_rows("a", range(30, 40), 0, 7))
    compact(ws, "train_steps", run_id="a", min_files=2)  # the merged file is merged again
    summaries = sorted((ws / "lake" / SUMMARY_DIR).rglob("*.parquet"))
    data = sorted((ws / "lake" / "train_steps").rglob("part-*.parquet"))
    assert [s.name for s in summaries] == [d.name for d in data] and len(data) == 1
    with Q.LakeReader(ws) as r:
        assert Q.steps_by_run(r)["rows"].tolist() == [40]


def test_esm3_compact_merges_an_old_lake_and_summarises_it(tmp_path, capsys):
    """A lake from before live compaction (one file per flush, and a run merged into one
    file without a summary): `esm3 compact` leaves one summarised file per run, with the
    answers unchanged."""
    from esm3.metrics.lake import compact
    from esm3.metrics.summaries import SUMMARY_DIR, remove_summary, summary_path
    from jobs.cli import main

    ws = tmp_path / "ws"
    ensure_lake(ws)
    for i in range(5):
        write_rows(ws, "train_steps", _step_rows("old", range(i * 20, i * 20 + 20), 0, i))
    for i in range(2):
        write_rows(ws, "train_steps", _step_rows("merged", range(i * 9, i * 9 + 9), 0, 9 + i))
    compact(ws, "train_steps", run_id="merged", min_files=2)
    remove_summary(ws, next((ws / "lake" / "train_steps").glob("run_id=merged/part-*")))
    write_rows(ws, "events", [{"run_id": "old", "step": s, "kind": "saved"} for s in (1, 2)])
    write_rows(ws, "events", [{"run_id": "old", "step": 3, "kind": "saved"}])
    before = _both(ws)[1]
    assert main(["compact", "--workspace", str(ws)]) == 0
    out = capsys.readouterr().out
    assert "events: 2 files merged" in out and "train_steps: 5 files merged" in out
    assert "train_steps: 1 merged files summarised" in out  # "old" got its own as merged
    files = sorted((ws / "lake" / "train_steps").rglob("part-*.parquet"))
    assert len(files) == 2 and all(summary_path(ws, f).is_file() for f in files)
    assert len(list((ws / "lake" / SUMMARY_DIR).rglob("*.parquet"))) == 2
    fast, plain = _both(ws)
    _same(fast, plain)
    _same(plain, before)


def test_page_queries_run_under_the_limits(seeded):
    """A reader with limits runs the pages' queries in a database with that memory limit
    and thread count, and stops a query at the timeout."""
    ws, _ = seeded
    Q.clear_caches()
    with Q.LakeReader(ws, limits=Q.Limits(memory="300MB", threads=1)) as r:
        got = r.sql(
            "SELECT current_setting('memory_limit') AS m, current_setting('threads') AS t"
        ).iloc[0]
        assert got["t"] == 1 and got["m"].replace(" ", "").upper() in (
            "286.1MIB",
            "300MB",
            "286MIB",
        )
        assert not Q.runs_overview(r).empty
    # a query that takes minutes, stopped at 0.05 s (a page query's own time is not at
    # stake here: on a loaded machine even a small one can take longer than that)
    Q.clear_caches()
    with Q.LakeReader(ws, limits=Q.Limits(timeout_s=0.05)) as r:
        with pytest.raises(Q.SqlStopped, match="stopped after"):
            r.sql("SELECT count(*) FROM range(100000000000) a")
    Q.clear_caches()


def test_a_live_writer_merges_its_own_files_and_the_pages_see_every_row(tmp_path):
    """`LakeWriter(compact_every=k)`: every k flushes its files in a run folder are merged
    into one (with a summary); the tail since stays as flushed; the summary-backed queries
    and the series answer as over the raw rows, and no row is lost or doubled."""
    from esm3.metrics.lake import LakeWriter
    from esm3.metrics.summaries import summary_path

    ws = tmp_path / "ws"
    ensure_lake(ws)
    with LakeWriter(ws, "train_steps", background=False, compact_every=4) as w:
        for i in range(11):  # 11 flushes: two merges of 4, a tail of 3 (then closed: 1 more)
            for row in _step_rows("a", range(i * 10, i * 10 + 10), 0, i, nan_at={33}):
                w.add(row)
            w.add(_step_rows("b", [i], 0, 50 + i)[0])  # a second run in the same flushes
            w.flush()
        folder = ws / "lake" / "train_steps" / "run_id=a"
        files = sorted(folder.glob("part-*.parquet"))
        merged = [f for f in files if summary_path(ws, f).is_file()]
        assert len(files) == 2 + 3 and len(merged) == 2
        assert sum(pq.read_metadata(f).num_rows for f in merged) == 80
        _same(*_both(ws))
        with Q.LakeReader(ws) as r:
            s = Q.series(r, ["a", "b"], ["loss"], max_points=1000)
        assert s.groupby("run_id")["n"].sum().to_dict() == {"a": 110, "b": 11}
        assert int(s["nonfinite"].sum()) == 1


def test_the_benchmark_lake_answers_alike_fast_and_plain(tmp_path):
    """The dashboard benchmark's lake (compacted attempts with summaries, live runs whose
    second attempt recomputes compacted steps): fast and plain queries agree, and every
    page's queries run under the limits."""
    from jobs.bench import bench_dashboard as B

    ws = tmp_path / "ws"
    ids = B.make_lake(ws, 60_000, 3)
    assert any((ws / "lake" / "_summaries").rglob("*.parquet"))
    fast, plain = _both(ws)
    _same(fast, plain)
    assert fast[0].set_index("run_id")["rows"].to_dict() == {i: 20_000 for i in ids}
    Q.clear_caches()
    with Q.LakeReader(ws, limits=Q.Limits.from_env({})) as r:
        for fn in B._pages(ids).values():
            fn(r)
    Q.clear_caches()
