"""The trainer's parts on their own: StepStats reduced over two real gloo ranks, the
rollback plan on a planted spike history, the fault-injecting iterator and loss, the
checkpoint cadence, the train_steps row."""

from __future__ import annotations

import math
import pickle

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from esm3.train.checkpointer import Checkpointer
from esm3.train.config import CheckpointConfig, StabilityConfig
from esm3.train.data import TrainBatch
from esm3.train.faults import faulty_loss, inject_faults
from esm3.train.loss import LossOutput
from esm3.train.reporting import EventLog, StepRows, StepTiming
from esm3.train.rollback import plan_rollback
from esm3.train.stability import StabilityMonitor
from esm3.train.stats import StepStats

TRACKS = ["sequence", "structure", "ss8"]
DATASETS = ["uniprot", "pdb"]


def _rank_stats(rank: int) -> StepStats:
    """Rank 0 has sequence loss only; rank 1 also structure, and asks to stop."""
    if rank == 0:
        return StepStats(
            loss=2.0,
            grad_norm=1.5,
            tokens=100,
            padding_fraction=0.2,
            tokens_by_dataset={"uniprot": 100, "pdb": 0},
            track_loss_sum={"sequence": 2.0 * 10},
            track_positions={"sequence": 10},
            max_attn_logit=3.0,
        )
    return StepStats(
        loss=4.0,
        grad_norm=1.5,
        tokens=60,
        padding_fraction=0.4,
        tokens_by_dataset={"uniprot": 20, "pdb": 40},
        track_loss_sum={"sequence": 3.0 * 30, "structure": 5.0 * 4},
        track_positions={"sequence": 30, "structure": 4},
        max_attn_logit=7.5,
        stop=True,
    )


def _reduce_on_rank(rank: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        reduced = _rank_stats(rank).all_reduce(TRACKS, DATASETS)
        with open(f"{out}.{rank}", "wb") as f:
            pickle.dump(reduced, f)
    finally:
        dist.destroy_process_group()


def test_step_stats_reduced_over_two_ranks(tmp_path):
    out = str(tmp_path / "reduced")
    mp.start_processes(
        _reduce_on_rank,
        args=(str(tmp_path / "store"), out),
        nprocs=2,
        start_method="spawn",
        join=True,
    )
    per_rank = [pickle.loads(open(f"{out}.{r}", "rb").read()) for r in (0, 1)]
    assert repr(per_rank[0]) == repr(per_rank[1])  # every rank decides on the same numbers
    s = per_rank[0]
    assert s.loss == 3.0 and s.stop and s.tokens == 160
    assert s.padding_fraction == pytest.approx(0.3)
    assert s.tokens_by_dataset == {"uniprot": 120, "pdb": 40}
    assert s.track_loss("sequence") == pytest.approx((20 + 90) / 40)  # position-weighted
    assert s.track_loss("structure") == 5.0 and s.track_loss("ss8") is None
    assert s.max_attn_logit == 7.5 and s.grad_norm == 1.5  # already global: not summed


def test_step_stats_in_a_world_of_one():
    s = _rank_stats(1).all_reduce(TRACKS, DATASETS)
    assert s.loss == 4.0 and s.stop and s.tokens == 60
    assert s.track_loss("sequence") == 3.0 and s.tokens_by_dataset == {"uniprot": 20, "pdb": 40}
    quiet = StepStats(1.0, 1.0, 5, 0.0, {"uniprot": 5}).all_reduce(TRACKS, DATASETS)
    assert quiet.max_attn_logit == -math.inf and quiet.tokens_by_dataset == {"uniprot": 5, "pdb": 0}


def test_rollback_plan_on_a_planted_spike_history():
    """Losses ~2 with spikes at steps 7 and 8 (2 within 5 steps): a rollback at 8 returns
    to checkpoint 4 and skips the data of steps 5..8 (indices 4..7)."""
    cfg = StabilityConfig(min_history=3, window=20, rollback=True)
    cfg.rollback_spikes, cfg.rollback_window = 2, 5
    monitor = StabilityMonitor(cfg)
    losses = {7: 60.0, 8: 80.0}
    verdicts = {s: monitor.observe(s, losses.get(s, 2.0 + 0.01 * s), 1.0) for s in range(1, 9)}
    assert [s for s, v in verdicts.items() if v.spike] == [7, 8]
    assert [s for s, v in verdicts.items() if v.rollback] == [8]

    plan = plan_rollback(8, 0, list(monitor.spike_steps), [4])
    assert plan is not None and plan.first_spike == 7 and plan.max_step == 6
    assert plan.last_bad_data == 7
    assert plan.resume_offset(4) == 4 and plan.skipped(4, 0) == 4
    assert plan.message("step_00000004", 4, 0) == (
        "rolled back from step 8 to step_00000004, skipping 4 batch(es) (data 4..7)"
    )
    # a second rollback after an earlier one: the restored offset counts
    again = plan_rollback(12, 4, [11], [8])
    assert again.resume_offset(8) == 8 and again.skipped(8, 4) == 4
    # no checkpoint before the first spike: nothing to return to
    assert plan_rollback(8, 0, [7, 8], [7, 8]) is None
    assert plan_rollback(8, 0, [7, 8], []) is None


def _batch(data_step: int) -> TrainBatch:
    return TrainBatch(data_step, data_step, 0, {}, {}, {}, 1, {}, 0.0)


def test_fault_injecting_iterator_and_loss():
    cfg = StabilityConfig(inject_nan=[1, 3], inject_spike=[3, 4], spike_scale=50.0)
    tagged = list(inject_faults(iter([_batch(i) for i in range(6)]), cfg))
    assert [b.fault for b in tagged] == ["", "nan", "", "nan", "spike", ""]  # NaN wins

    def base(output, batch):
        return LossOutput(torch.tensor(2.0), {}, {})

    loss = faulty_loss(base, cfg)
    assert loss(None, tagged[0]).loss.item() == 2.0
    assert math.isnan(loss(None, tagged[1]).loss.item())
    assert loss(None, tagged[4]).loss.item() == 100.0


def test_no_faults_leaves_iterator_and_loss_untouched():
    cfg = StabilityConfig()
    it = iter([_batch(0)])
    assert inject_faults(it, cfg) is it

    def base(output, batch):
        return LossOutput(torch.tensor(1.0), {}, {})

    assert faulty_loss(base, cfg) is base


def _checkpointer(**cfg) -> Checkpointer:
    model = torch.nn.Linear(2, 2)
    return Checkpointer(
        CheckpointConfig(**cfg),
        "/nonexistent",
        model,
        torch.optim.AdamW(model.parameters()),
        fingerprint={},
        events=EventLog("t", 0, lambda r: None),
        flush=lambda: None,
    )


def test_checkpoint_cadence():
    every3 = _checkpointer(every=3)
    assert [s for s in range(1, 11) if every3.periodic_due(s, 10)] == [3, 6, 9]
    every5 = _checkpointer(every=5)  # the last step gets the final save, not a periodic one
    assert [s for s in range(1, 11) if every5.periodic_due(s, 10)] == [5]
    assert not any(_checkpointer(every=0).periodic_due(s, 10) for s in range(1, 11))
    both = _checkpointer(every=2, async_save=True)
    assert both.is_async("periodic") and not both.is_async("preemption")
    assert not both.is_async("final") and not every3.is_async("periodic")
    assert every3.steps() == []


def test_train_steps_row_columns_and_cadence():
    got = []
    rows = StepRows(
        "r", 2, 5, 1.0, TRACKS, [], torch.device("cpu"), 1, None, lambda n: 1e6, got.append
    )
    stats = _rank_stats(1).all_reduce(TRACKS, DATASETS)
    stats.lr, stats.skipped = 1e-3, False
    for step in range(1, 13):
        rows.emit(
            step,
            12,
            0,
            "one",
            stats,
            tokens_seen=60 * step,
            tokens_by_dataset={"uniprot": 1, "pdb": 2},
            timing=StepTiming(0.5, 0.1),
            seq_len=64,
        )
    assert [r["step"] for r in got] == [5, 10, 12]
    r = got[0]
    assert list(r)[:6] == ["run_id", "step", "attempt", "stage", "loss", "lr"]
    assert [k for k in r if k.startswith("loss_")] == [
        "loss_sequence",
        "loss_structure",
        "loss_ss8",
    ]
    assert r["attempt"] == 2 and r["clipped"] and r["update_ratio"] is None
    assert r["tokens_per_s"] == 120 and r["mfu"] is None and r["max_attn_logit"] == 7.5
    assert r["tokens_by_dataset"] == '{"pdb": 2, "uniprot": 1}'
    rows.emit(
        5,
        12,
        1,
        "one",
        stats,
        tokens_seen=0,
        tokens_by_dataset={},
        timing=StepTiming(1, 0),
        seq_len=64,
    )
    assert len(got) == 3  # only rank 0 writes rows
