"""Pure parts of training: LR schedule, stability monitor, mixing, config and data checks,
deterministic per-rank batches, the inverse-folding 50/50 rule."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from esm3.train.config import StabilityConfig, TrainConfigError
from esm3.train.data import BatchBuilder, batches, load_datasets, mixing_weights
from esm3.train.optim import lr_at, scaled_peak_lr
from esm3.train.stability import StabilityMonitor
from jobs.config import ConfigError
from jobs.train.config import check_inputs, load_config
from tests.train.conftest import data_root, write_config


def test_lr_schedule_closed_form():
    peak, warm, total = 1e-3, 10, 110
    assert lr_at(0, peak=peak, warmup=warm, total=total) == pytest.approx(peak / 10)
    assert lr_at(4, peak=peak, warmup=warm, total=total) == pytest.approx(peak * 5 / 10)
    assert lr_at(10, peak=peak, warmup=warm, total=total) == pytest.approx(peak)
    # cosine halfway between warmup end (10) and the last step (109): 0.1 + 0.9 * 0.5
    assert lr_at(10 + 99 / 2, peak=peak, warmup=warm, total=total) == pytest.approx(0.55 * peak)
    assert lr_at(109, peak=peak, warmup=warm, total=total) == pytest.approx(0.1 * peak)
    assert lr_at(500, peak=peak, warmup=warm, total=total) == pytest.approx(0.1 * peak)
    lrs = [lr_at(s, peak=peak, warmup=warm, total=total) for s in range(10, 110)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))


def test_lr_scaled_inversely_with_sqrt_params():
    assert scaled_peak_lr(4e-4, 400, 100) == pytest.approx(2e-4)
    assert scaled_peak_lr(4e-4, 100, 100) == pytest.approx(4e-4)
    with pytest.raises(ValueError, match="must be > 0"):
        scaled_peak_lr(4e-4, 0, 100)


def test_stability_spikes_nonfinite_rollback_and_state():
    cfg = StabilityConfig(window=5, min_history=3, loss_spike=1.5, grad_spike=4.0)
    cfg.rollback, cfg.rollback_spikes, cfg.rollback_window, cfg.max_nonfinite = True, 2, 5, 2
    m = StabilityMonitor(cfg)
    for s, loss in enumerate([2.0, 2.2, 1.8], 1):
        v = m.observe(s, loss, 1.0)
        assert not v.spike and not v.nonfinite
    v = m.observe(4, 3.5, 1.0)  # 3.5 > 1.5 * median 2.0
    assert v.loss_spike and not v.grad_spike and v.loss_median == pytest.approx(2.0)
    assert not v.rollback
    v = m.observe(5, 2.0, 4.5)  # grad 4.5 > 4 * median 1.0; second spike within 5 steps
    assert v.grad_spike and v.rollback
    state = m.state_dict()
    assert len(m.losses) == 3  # spikes never enter the history
    v = m.observe(6, math.nan, 1.0)
    assert v.nonfinite and m.nonfinite_total == 1 and not v.abort
    m.observe(7, 2.0, math.inf)
    assert m.observe(8, math.nan, 1.0).abort.startswith("3 consecutive non-finite")
    m2 = StabilityMonitor(cfg)
    m2.load_state_dict(state)
    assert m2.state_dict() == state


def test_mixing_weights_sequence_and_structure_weighted_separately(tmp_path, train_data):
    cfg = load_config(
        write_config(tmp_path / "c.toml", train_data),
        ["data.sequence_weight=3.0", "data.structure_weight=1.0"],
    )
    w = mixing_weights(cfg, cfg.stages[0])
    assert w == pytest.approx({"uniprot": 0.75, "pdb": 0.25})
    cfg.stages[1].weights = {"pdb": 0.0}
    assert mixing_weights(cfg, cfg.stages[1]) == pytest.approx({"uniprot": 1.0, "pdb": 0.0})


def test_bad_inputs_are_one_line_errors_before_training(tmp_path, train_data, workspace):
    path = write_config(tmp_path / "c.toml", train_data)
    cfg = load_config(path)
    cfg.data.datasets[1].shards = [str(train_data / "nowhere" / "*.parquet")]
    with pytest.raises(ConfigError, match=r"dataset 'pdb' shards: no file matches .*nowhere"):
        check_inputs(cfg, workspace, 1)
    cfg = load_config(path, ["data.batch_size=5"])
    with pytest.raises(
        ConfigError, match="batch_size': 5 samples .* not divisible by the world size 2"
    ):
        check_inputs(cfg, workspace, 2)
    with pytest.raises(
        ConfigError, match=r"stages\[0\].weights.*\['mgnify'\] not in data.datasets"
    ):
        load_config(path, ["stages=[{name='a', steps=2, context_length=64, weights={mgnify=1.0}}]"])
    with pytest.raises(ConfigError, match="model.preset"):
        load_config(path, ["model.preset=huge"])
    with pytest.raises(ConfigError, match="unknown config key 'optim.lrr'"):
        load_config(path, ["optim.lrr=1"])


def test_each_rank_draws_its_own_deterministic_stream(tmp_path, train_data):
    cfg = load_config(write_config(tmp_path / "c.toml", train_data))
    ds = load_datasets(cfg, data_root(cfg))
    b0 = BatchBuilder(cfg, ds, rank=0, per_rank=2)
    b1 = BatchBuilder(cfg, ds, rank=1, per_rank=2)
    x, y = b0.build(4, 4), BatchBuilder(cfg, ds, rank=0, per_rank=2).build(4, 4)
    for k in x.inputs:
        assert torch.equal(torch.nan_to_num(x.inputs[k]), torch.nan_to_num(y.inputs[k])), k
    ids0 = [p.id for _, p, _ in b0.proteins(0, 4)]
    ids1 = [p.id for _, p, _ in b1.proteins(0, 4)]
    assert ids0 != ids1 or not torch.equal(x.inputs["sequence"], b1.build(4, 4).inputs["sequence"])
    # stage 0 is sequence-only: no structure input, no structure loss
    s0 = b0.build(0, 0)
    assert not s0.loss_masks["structure"].any() and s0.inputs["sequence"].shape[1] <= 64
    # a worker process builds exactly what the training process would
    inproc = list(batches(b0, 2, 5, 7, workers=0))
    viaworker = list(batches(b0, 2, 5, 7, workers=1, prefetch=2))
    assert [b.data_step for b in viaworker] == [9, 10, 11]
    for a, b in zip(inproc, viaworker, strict=True):
        assert torch.equal(a.inputs["sequence"], b.inputs["sequence"])
        assert torch.equal(a.targets["sequence"], b.targets["sequence"])


def test_inverse_folding_50_50_rule(tmp_path, train_data):
    shard = next((train_data / "real" / "structures").glob("*.parquet"))
    t = pq.read_table(shard, columns=["id", "sequence"])
    rng = np.random.default_rng(0)
    alphabet = np.array(list("ACDEFGHIKLMNPQRSTVWY"))
    rows = [
        {"id": i, "sequence": "".join(rng.choice(alphabet, len(s)))}
        for i, s in zip(t["id"].to_pylist(), t["sequence"].to_pylist(), strict=True)
        for _ in range(2)
    ]
    gen = {r["sequence"] for r in rows}
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "gen.parquet")
    cfg = load_config(
        write_config(tmp_path / "c.toml", train_data),
        ["data.structure_weight=1.0", "data.sequence_weight=0.0"],
    )
    cfg.data.datasets[1].inverse_folded = [str(tmp_path / "gen.parquet")]
    ds = load_datasets(cfg, data_root(cfg))
    b = BatchBuilder(cfg, ds, rank=0, per_rank=50)
    original = dict(zip(t["id"].to_pylist(), t["sequence"].to_pylist(), strict=True))
    swapped = n = 0
    for step in range(4):
        for name, p, _ in b.proteins(0, step):
            assert name == "pdb"
            n += 1
            if p.sequence != original[p.id]:
                assert p.sequence in gen and len(p.sequence) == len(original[p.id])
                swapped += 1
    # 200 draws at p = 0.5: outside [70, 130] has probability < 1e-5
    assert 70 <= swapped <= 130, swapped
    with pytest.raises(TrainConfigError, match="inverse folding trains on structure datasets"):
        cfg.data.task = "inverse_folding"
        cfg.validate()
