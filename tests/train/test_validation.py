"""Validation loss during training on real shards: the seeded subset, rank shards over two
gloo ranks (FSDP), events at the configured steps with per-dataset per-track losses, the
same numbers for the same weights, training untouched, and the `validation` SQL view."""

from __future__ import annotations

import json
import pickle
from datetime import timedelta

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.distributed as dist

from esm3.data.store import COLUMNS
from esm3.metrics.catalog import query
from esm3.metrics.lake import write_rows
from esm3.metrics.queries import validation_loss
from esm3.metrics.reader import LakeReader
from esm3.train.config import TrainConfigError, ValidationConfig
from esm3.train.data import DataError, load_datasets
from esm3.train.loss import ESM3Loss
from esm3.train.trainer import Sinks, esm3_train_model, train
from esm3.train.validation import (
    Evaluator,
    choose_subset,
    load_validation,
    shard,
    validation_files,
)
from jobs.config import ConfigError
from jobs.train.config import check_inputs, load_config
from tests.ranks import exit_rank, spawn_two_ranks
from tests.train.conftest import data_root, stop_after_calls, write_config

DATASETS = ["jgi", "mgnify", "pdb", "uniref"]


def _config(tmp_path, data_root, every=3, rows=5, batch_size=2, more="", overrides=()):
    """The 8-step tiny config (stages 'seq' 0-2, 'all' 3-7) with validation over the three
    sequence validation sets and the structure shard (dataset 'pdb', every track)."""
    files = [f"{data_root}/real/validation/*.parquet", f"{data_root}/real/structures/*.parquet"]
    extra = (
        f"[validation]\nevery = {every}\nrows = {rows}\nbatch_size = {batch_size}\n"
        f"files = {json.dumps(files)}\n{more}"
    )
    return load_config(write_config(tmp_path / "c.toml", data_root, extra), list(overrides))


# --- the subset and the shards ---------------------------------------------------------


def test_subset_is_seeded_order_free_and_a_prefix_of_larger_ones():
    rng = np.random.default_rng(0)
    ids = [f"P{i:05d}" for i in range(300)]
    ds = [("a", "b", "c")[i % 3] for i in range(300)]
    got = choose_subset(ids, ds, 20, seed=7)
    assert list(got) == ["a", "b", "c"] and all(len(v) == 20 for v in got.values())
    assert all({ds[i] for i in v} == {name} for name, v in got.items())
    # the same ids whatever the row order
    perm = rng.permutation(300)
    shuffled = choose_subset([ids[i] for i in perm], [ds[i] for i in perm], 20, seed=7)
    for name in got:
        assert [ids[perm[i]] for i in shuffled[name]] == [ids[i] for i in got[name]]
    # fewer rows: the first of the larger subset; more than there are: all of them
    small = choose_subset(ids, ds, 5, seed=7)
    assert all(list(small[n]) == list(got[n][:5]) for n in got)
    assert sorted(choose_subset(ids, ds, 1000, seed=7)["a"]) == list(range(0, 300, 3))
    # another seed, another subset
    assert set(choose_subset(ids, ds, 20, seed=8)["a"]) != set(got["a"])


@pytest.mark.parametrize("n,world", [(0, 2), (1, 2), (5, 2), (25, 4), (7, 1), (3, 8)])
def test_rank_shards_are_disjoint_and_cover(n, world):
    parts = [set(shard(n, r, world)) for r in range(world)]
    assert sum(len(p) for p in parts) == n and set().union(*parts) == set(range(n))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1  # balanced


def _section(data_root, rows):
    files = [f"{data_root}/real/validation/*.parquet", f"{data_root}/real/structures/*.parquet"]
    return ValidationConfig(every=1, rows=rows, seed=3, files=files)


def test_load_reads_the_chosen_rows_and_only_record_columns(train_data):
    cfg = _section(train_data, rows=5)
    files = validation_files(cfg, "/")
    got = load_validation(cfg, "/")
    full = [pq.read_table(f) for f in files]
    ids = sum((t.column("id").to_pylist() for t in full), [])
    ds = sum((t.column("dataset").to_pylist() for t in full), [])
    want = choose_subset(ids, ds, 5, seed=cfg.seed)
    assert list(got) == DATASETS
    for name, t in got.items():
        assert t.column("id").to_pylist() == [ids[i] for i in want[name]]
        assert set(t.column("dataset").to_pylist()) == {name}
        assert set(t.column_names) <= {"dataset", *COLUMNS}
    assert "description" in full[0].column_names and "description" not in got["uniref"].column_names


def test_bad_validation_configs_and_files_are_one_line_errors(tmp_path, train_data, workspace):
    cfg = _config(tmp_path, train_data)
    for key, value, msg in [
        ("every", -1, "validation.every"),
        ("rows", 0, "validation.rows"),
        ("seed", -1, "validation.seed"),
        ("batch_size", 0, "validation.batch_size"),
        ("files", [], "validation.files"),
    ]:
        bad = _config(tmp_path, train_data)
        setattr(bad.validation, key, value)
        with pytest.raises(TrainConfigError, match=msg):
            bad.validate()
    cfg.validation.files = [str(tmp_path / "none-*.parquet")]
    with pytest.raises(DataError, match="no file matches"):
        validation_files(cfg.validation, "/")
    with pytest.raises(ConfigError, match=r"^config key 'validation.files': .*none-\*.parquet"):
        check_inputs(cfg, workspace, 1)  # before submission
    ingested = train_data / "real" / "ingest" / "uniprot_full.parquet"
    pq.write_table(pq.read_table(ingested, columns=["id", "sequence"]), tmp_path / "v.parquet")
    cfg.validation.files = [str(tmp_path / "v.parquet")]
    with pytest.raises(DataError, match=r"v.parquet has no column\(s\) \['dataset'\]"):
        validation_files(cfg.validation, "/")


def _evaluations(cfg, records, rank: int, world: int) -> dict:
    """The config's model (FSDP when world > 1) evaluated after step 2 (stage 'seq') and
    twice after step 8 (stage 'all'); the ids this rank evaluated; whether the model's mode
    and torch's generator came back unchanged."""
    model = esm3_train_model(cfg, torch.device("cpu"), distributed=world > 1)
    loss = ESM3Loss(cfg.loss_weights)
    ev = Evaluator(
        cfg, records, loss, torch.device("cpu"), tracks=model.tracks, rank=rank, world=world
    )
    rng = torch.get_rng_state()
    return dict(
        ids={n: ev.rank_ids(n) for n in records},
        results=[ev.evaluate(model.module, s) for s in (2, 8, 8)],
        untouched=model.module.training and torch.equal(rng, torch.get_rng_state()),
    )


def _evaluate_on_rank(rank: int, store: str, cfg, records, out: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=2, timeout=timedelta(minutes=2)
    )
    try:
        torch.set_num_threads(1)
        got = _evaluations(cfg, records, rank, 2)
        with open(f"{out}.{rank}", "wb") as f:
            pickle.dump(got, f)
    finally:
        dist.destroy_process_group()
    exit_rank()  # only after success: a failure above propagates to the parent


def _evaluate_on_two_ranks(tmp_path, cfg, records) -> list[dict]:
    out = str(tmp_path / "eval")
    spawn_two_ranks(_evaluate_on_rank, (str(tmp_path / "store"), cfg, records, out), 240)
    return [pickle.loads(open(f"{out}.{r}", "rb").read()) for r in range(2)]


def test_two_ranks_share_the_subset_and_agree_with_one(tmp_path, train_data):
    # 5 rows in batches of 2 over 2 ranks: rank 1's second batch is empty (a placeholder
    # keeps the FSDP collectives in step)
    cfg = _config(tmp_path, train_data, rows=5, batch_size=2)
    records = load_validation(cfg.validation, "/")
    two = _evaluate_on_two_ranks(tmp_path, cfg, records)
    one = _evaluations(cfg, records, 0, 1)  # no process group: a world of one
    for name, t in records.items():
        a, b = (set(r["ids"][name]) for r in two)
        assert not a & b and a | b == set(t.column("id").to_pylist())
        assert len(a) == 3 and len(b) == 2
    assert repr(two[0]["results"]) == repr(two[1]["results"])  # every rank, the same numbers
    assert all(r["untouched"] for r in [*two, one])
    # the same weights evaluated twice: the same numbers, to the bit
    assert repr(one["results"][1]) == repr(one["results"][2])
    assert repr(two[0]["results"][1]) == repr(two[0]["results"][2])
    for r2, r1 in zip(two[0]["results"], one["results"], strict=True):
        assert r2.positions == r1.positions and r2.proteins == r1.proteins
        for d in DATASETS:
            assert r2.dataset_loss(d) == pytest.approx(r1.dataset_loss(d), rel=1e-5)
    seq_stage, all_stage, _ = one["results"]
    assert seq_stage.stage == "seq" and all_stage.stage == "all"
    # the stage's tracks: structure counts only where the stage has the track
    assert seq_stage.positions["pdb"]["structure"] == 0
    assert all_stage.positions["pdb"]["structure"] > 0
    assert all(all_stage.positions[d]["structure"] == 0 for d in ("jgi", "mgnify", "uniref"))
    assert all(all_stage.proteins[d] == 5 for d in DATASETS)


# --- in the training loop --------------------------------------------------------------


def _train(cfg, ckdir, validation=None, stop_after=None):
    rows, events = [], []
    res = train(
        cfg,
        load_datasets(cfg, data_root(cfg)),
        run_id="val",
        ckpt_dir=ckdir,
        sinks=Sinks(rows.append, events.append),
        should_stop=stop_after_calls(stop_after),
        validation=validation,
    )
    return res, rows, [e for e in events if e["kind"] == "validation"]


@pytest.mark.parametrize(
    "batch", [[], ["data.batch_size=0", "data.batch_tokens=256"]], ids=["samples", "tokens"]
)
def test_events_at_the_configured_steps_and_training_untouched(
    tmp_path, train_data, process_group, workspace, batch
):
    cfg = _config(tmp_path, train_data, every=3, more="[checkpoint]\nevery = 2\n", overrides=batch)
    records = load_validation(cfg.validation, "/")
    on, on_rows, events = _train(cfg, tmp_path / "on", records)
    off, off_rows, none = _train(cfg, tmp_path / "off")
    assert none == []
    # every 3 steps and at the last (8)
    assert [e["step"] for e in events] == [3, 6, 8]
    # validation changes no training loss, batch or RNG stream
    assert on.losses == off.losses
    assert [r["loss"] for r in on_rows] == [r["loss"] for r in off_rows]
    for e in events:
        d = json.loads(e["detail"])
        per = {(r["dataset"], r["track"]): r for r in d["per_dataset"]}
        assert {ds for ds, _ in per} == set(DATASETS)
        # the value: the mean over datasets of each dataset's loss
        assert e["value"] == pytest.approx(np.mean([per[(ds, "loss")]["loss"] for ds in DATASETS]))
        assert d["loss_sequence"] == pytest.approx(
            np.mean([per[(ds, "loss_sequence")]["loss"] for ds in DATASETS])
        )
        # a dataset's loss: its tracks' losses, weighted as in training (weights 1)
        pdb = [v for (ds, t), v in per.items() if ds == "pdb" and t != "loss"]
        assert per[("pdb", "loss")]["loss"] == pytest.approx(sum(r["loss"] for r in pdb))
        assert per[("pdb", "loss")]["tokens"] == sum(r["tokens"] for r in pdb)
        assert all(r["tokens"] > 0 and r["loss"] > 0 for r in per.values())
        assert d["proteins"] == dict.fromkeys(DATASETS, 5)
    stages = [json.loads(e["detail"])["stage"] for e in events]
    assert stages == ["seq", "all", "all"]
    assert "loss_structure" not in json.loads(events[0]["detail"])  # stage 'seq'
    assert "loss_structure" in json.loads(events[1]["detail"])

    # preempted after step 5 and resumed with validation on: the same losses and events
    part, _, first = _train(cfg, tmp_path / "resumed", records, stop_after=5)
    rest, _, second = _train(cfg, tmp_path / "resumed", records)
    assert part.status == "preempted" and rest.resumed_from == 5
    assert {**part.losses, **rest.losses} == on.losses
    assert [(e["step"], e["value"]) for e in first + second] == [
        (e["step"], e["value"]) for e in events
    ]

    _check_sql_view(workspace, events)


def _check_sql_view(workspace, events):
    """The `validation` view: one row per (run, step, dataset, loss column), the latest
    evaluation of a step; malformed details skipped; the dashboard's query reads the same."""
    later = dict(
        events[-1],
        value=1.0,
        detail=json.dumps(
            dict(per_dataset=[dict(dataset="jgi", track="loss", loss=1.0, tokens=7)])
        ),
    )
    later["time"] = events[-1]["time"] + timedelta(seconds=1)
    junk = dict(events[0], step=99, detail="{not json")
    write_rows(workspace, "events", [*events, later, junk])
    df = query(workspace, "SELECT * FROM validation ORDER BY step, dataset, track")
    assert list(df.columns) == ["run_id", "step", "dataset", "track", "loss", "tokens", "time"]
    assert sorted(set(df["step"])) == [3, 6, 8]
    for e in events[:2]:
        want = sorted(
            (r["dataset"], r["track"], r["loss"], r["tokens"])
            for r in json.loads(e["detail"])["per_dataset"]
        )
        got = df[df["step"] == e["step"]]
        assert (
            sorted(zip(got["dataset"], got["track"], got["loss"], got["tokens"], strict=True))
            == want
        )
    last = df[(df["step"] == 8) & (df["dataset"] == "jgi") & (df["track"] == "loss")]
    assert last["loss"].tolist() == [1.0] and last["tokens"].tolist() == [7]
    n = query(
        workspace,
        "SELECT count(*) AS n FROM validation WHERE run_id = $r AND dataset = $d",
        {"r": "val", "d": "pdb"},
    )
    assert n["n"].iloc[0] == len(df[df["dataset"] == "pdb"])
    with LakeReader(workspace) as r:
        val = validation_loss(r, ["val"])
    assert set(val["track"]) >= {"loss", "loss_sequence", "loss_structure"}
    assert sorted(set(val["step"])) == [3, 6, 8, 99]  # the value is drawn even without detail
