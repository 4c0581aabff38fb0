"""The training loop in one process (gloo, world size 1, FP32 on CPU) on real shards:
exact resume after an interruption with a corrupt latest checkpoint (sample- and
token-counted batches), planted NaN and spikes, rollback, checkpoints of another model
refused."""

from __future__ import annotations

import json
import math

import pytest

from esm3.train import checkpoint as ckpt
from esm3.train.data import load_datasets
from esm3.train.trainer import Sinks, train
from jobs.config import ConfigError
from jobs.train.config import check_inputs, load_config
from tests.train.conftest import stop_after_calls, write_config

pytestmark = pytest.mark.usefixtures("process_group")


def _run(cfg, data_root, ckdir, stop_after=None):
    rows, events = [], []
    res = train(
        cfg,
        load_datasets(cfg, data_root),
        run_id="t",
        ckpt_dir=ckdir,
        sinks=Sinks(rows.append, events.append),
        should_stop=stop_after_calls(stop_after),
    )
    return res, rows, events


@pytest.mark.parametrize(
    "batch", [[], ["data.batch_size=0", "data.batch_tokens=256"]], ids=["samples", "tokens"]
)
def test_interrupted_and_resumed_equals_uninterrupted_with_corrupt_latest(
    tmp_path, train_data, batch
):
    path = write_config(tmp_path / "c.toml", train_data, "[checkpoint]\nevery = 2")
    cfg = load_config(path, batch)
    ref, ref_rows, ref_events = _run(cfg, train_data, tmp_path / "ref")
    assert ref.status == "completed" and sorted(ref.losses) == list(range(1, 9))
    assert [r["step"] for r in ref_rows] == list(range(1, 9))
    stages = [
        (e["step"], json.loads(e["detail"])["stage"]) for e in ref_events if e["kind"] == "stage"
    ]
    assert stages == [(0, "seq"), (3, "all")]
    row = ref_rows[-1]
    assert row["loss_sequence"] > 0 and row["lr"] > 0 and row["tokens"] > 0
    assert row["update_ratio"] > 0 and row["max_attn_logit"] is not None
    assert set(json.loads(row["tokens_by_dataset"])) == {"uniprot", "pdb"}
    assert sum(json.loads(row["tokens_by_dataset"]).values()) == row["tokens_seen"]
    assert row["tokens_seen"] == sum(r["tokens"] for r in ref_rows)
    if cfg.data.batch_tokens:  # each step's real tokens: 90-100% of the budget
        assert all(0.9 * 256 <= r["tokens"] <= 256 for r in ref_rows), [
            r["tokens"] for r in ref_rows
        ]

    # interrupted after step 5 (the stop flag): checkpoints 2, 4 and 5 (preemption)
    ck = tmp_path / "run"
    part, _, ev = _run(cfg, train_data, ck, stop_after=5)
    assert part.status == "preempted" and part.step == 5
    assert [s for s, _ in ckpt.list_checkpoints(ck)] == [2, 4, 5]  # keep=3
    assert any(e["kind"] == "preempt" for e in ev)
    # corrupt the latest: the resume falls back to step 4, and still matches
    shard = next((ck / "step_00000005").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])
    rest, rows, ev = _run(cfg, train_data, ck)
    kinds = [e["kind"] for e in ev]
    assert "checkpoint_corrupt" in kinds and rest.resumed_from == 4
    assert [r["step"] for r in rows] == [5, 6, 7, 8]
    for s in (5, 6, 7, 8):
        assert rest.losses[s] == ref.losses[s], (s, rest.losses[s], ref.losses[s])
    assert [r["loss"] for r in rows] == [r["loss"] for r in ref_rows[4:]]


def test_planted_nan_skipped_spikes_detected_and_rolled_back(tmp_path, train_data):
    stages = """
[[stages]]
name = "one"
steps = 12
context_length = 64
tracks = ["sequence"]
"""
    over = [
        "checkpoint.every=4",
        "stability.inject_nan=[1]",
        "stability.inject_spike=[6, 7]",
        "stability.spike_scale=50.0",
        "stability.rollback=true",
        "stability.rollback_spikes=2",
        "stability.rollback_window=5",
    ]
    cfg = load_config(write_config(tmp_path / "c.toml", train_data, stages=stages), over)
    res, rows, ev = _run(cfg, train_data, tmp_path / "ck")
    by = {}
    for e in ev:
        by.setdefault(e["kind"], []).append(e)
    nonfinite = by["nonfinite"]
    assert [e["step"] for e in nonfinite] == [2] and json.loads(nonfinite[0]["detail"])[
        "fault"
    ] == "nan"
    step2 = [r for r in rows if r["step"] == 2][0]
    assert step2["skipped"] and math.isnan(step2["loss"])
    spikes = by["spike"]
    assert [e["step"] for e in spikes] == [7, 8]  # data 6 and 7 are trained at steps 7, 8
    (rb,) = by["rollback"]
    d = json.loads(rb["detail"])
    assert d["from_step"] == 8 and d["to_step"] == 4 and d["skipped"] == 4
    # after the rollback, steps 5.. are trained again on data 8.. : no more spikes
    assert res.status == "completed" and res.step == 12
    last = {}
    for r in rows:
        last[r["step"]] = r
    assert sorted(last) == list(range(1, 13))
    assert all(not (r["loss"] > 5 * last[4]["loss"]) for s, r in last.items() if s > 4)


def test_checkpoint_from_another_model_is_refused(tmp_path, train_data, workspace):
    small = load_config(
        write_config(tmp_path / "c.toml", train_data, "[checkpoint]\nevery = 1"),
        ["stages=[{name='a', steps=1, context_length=64}]"],
    )
    _run(small, train_data, tmp_path / "ck")
    ((step, path),) = ckpt.list_checkpoints(tmp_path / "ck")
    other = load_config(tmp_path / "c.toml", ["model.d_model=96", f"checkpoint.init_from={path}"])
    with pytest.raises(
        ConfigError, match=r"from another model \(d_model: checkpoint 64 vs config 96"
    ):
        check_inputs(other, workspace, 1)
    # resuming into a different model in the same folder stops before training
    other.checkpoint.init_from = ""
    with pytest.raises(ckpt.CheckpointMismatch, match="d_model"):
        _run(other, train_data, tmp_path / "ck")


def test_inverse_folding_trains_and_generates_for_the_loader(tmp_path, train_data, workspace):
    """The tiny inverse folding variant trains (loss on sequence only), an array job on the
    local executor writes 3 sequences per structure, and the ESM3 loader reads them."""
    from esm3.train.data import load_dataset
    from jobs.clusters import load_profile
    from jobs.train.generate import submit_generation

    extra = """
[checkpoint]
every = 2
"""
    stages = """
[[stages]]
name = "if"
steps = 2
context_length = 128
tracks = ["sequence", "coords"]
"""
    over = [
        "model.preset=inverse_folding_200m",
        "model.d_model=64",
        "model.n_layers=2",
        "data.task=inverse_folding",
        f"data.datasets=[{{name='pdb', type='structure', shards=['{train_data}/real/structures/*.parquet']}}]",
    ]
    cfg = load_config(write_config(tmp_path / "c.toml", train_data, extra, stages=stages), over)
    res, rows, _ = _run(cfg, train_data, tmp_path / "ck")
    assert res.status == "completed"
    assert all(r["loss_structure"] is None and r["loss_sequence"] > 0 for r in rows)
    ((_, path),) = ckpt.list_checkpoints(tmp_path / "ck")
    data_cfg = load_config(tmp_path / "c.toml", over)
    data_cfg.data.datasets[0].shards = [
        str(next((train_data / "real" / "structures").glob("*.parquet")))
    ]
    run_id, sub = submit_generation(
        workspace, load_profile("local"), data_cfg, str(path), per_structure={"pdb": 3}
    )
    (summary,) = sub.wait(timeout_s=300, progress=False)
    assert summary["sequences"] == 3 * 17
    import pyarrow.parquet as pq

    gen = pq.read_table(summary["out"]).to_pylist()
    orig = {
        r["id"]: r["sequence"]
        for r in pq.read_table(data_cfg.data.datasets[0].shards[0]).to_pylist()
    }
    assert all(len(g["sequence"]) == len(orig[g["id"]]) for g in gen)
    assert all(set(g["sequence"]) <= set("ACDEFGHIKLMNPQRSTVWY") for g in gen)
    spec = data_cfg.data.datasets[0]
    spec.inverse_folded = [summary["out"]]
    ds = load_dataset(spec, train_data)
    assert sum(len(ds.generated(r)) for r in range(len(ds))) == 3 * 17
