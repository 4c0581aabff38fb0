"""Token-counted batches (data.batch_tokens): the budget counted from the batch tensors,
batches a pure function of (seed, rank, step, data index), the sample-counted batches
unchanged, packed samples invisible to each other in the model, and the config's checks."""

from __future__ import annotations

import hashlib
from dataclasses import replace

import pytest
import torch

from esm3.model.backends import _seqlens
from esm3.model.esm3 import ESM3
from esm3.tokenize.specials import SEQUENCE_BOS, SEQUENCE_EOS, SEQUENCE_PAD
from esm3.train.config import TrainConfigError
from esm3.train.data import BatchBuilder, TrainBatch, batches, load_datasets
from esm3.train.token_batches import CHUNK, draw_stream, fill_rows
from jobs.clusters import load_profile
from jobs.config import ConfigError
from jobs.train.config import check_memory, load_config
from tests.train.conftest import write_config

TOKENS = ["data.batch_size=0", "data.batch_tokens=512"]
# (step, data index) keys over both stages of write_config's run (seq: 64, all: 128)
KEYS = [(s % 8, s + 3) for s in range(24)]


@pytest.fixture(scope="module")
def token_setup(tmp_path_factory, train_data):
    path = write_config(tmp_path_factory.mktemp("tok") / "c.toml", train_data)
    cfg = load_config(path, TOKENS)
    return cfg, load_datasets(cfg, "/")


def _same(a: TrainBatch, b: TrainBatch) -> bool:
    groups = [(a.inputs, b.inputs), (a.targets, b.targets), (a.loss_masks, b.loss_masks)]
    return all(
        x.keys() == y.keys()
        and all(torch.equal(torch.nan_to_num(x[k]), torch.nan_to_num(y[k])) for k in x)
        for x, y in groups
    )


def _runs(seq_id: torch.Tensor) -> list[tuple[int, int]]:
    """(start, end) of each packed sample of a row (sequence_id >= 0)."""
    out, start = [], 0
    ids = seq_id.tolist()
    for t in range(1, len(ids) + 1):
        if t == len(ids) or ids[t] != ids[start]:
            if ids[start] >= 0:
                out.append((start, t))
            start = t
    return out


@pytest.mark.parametrize("world", [1, 2])
def test_every_step_fills_90_to_100_percent_of_its_tokens(token_setup, world):
    cfg, ds = token_setup
    per_rank = cfg.check_world_size(world)
    assert per_rank == 512 // world
    for rank in range(world):
        b = BatchBuilder(cfg, ds, rank=rank, per_rank=per_rank)
        for step, data_step in KEYS:
            batch = b.build(step, data_step)
            ctx = cfg.stage_at(step)[1].context_length
            seq_id = batch.inputs["sequence_id"]
            assert tuple(seq_id.shape) == (per_rank // ctx, ctx)
            real = int((seq_id >= 0).sum())  # counted from the tensors, not the builder
            assert real == int((batch.inputs["sequence"] != SEQUENCE_PAD).sum()) == batch.n_tokens
            assert 0.9 * per_rank <= real <= per_rank, (rank, step, real)
            assert sum(batch.tokens_by_dataset.values()) == real
            assert batch.padding_fraction == pytest.approx(1 - real / per_rank)
            # every row: whole samples (bos ... eos, or neither: a cropped fragment) side
            # by side, positions restarting at 0
            for row in range(seq_id.shape[0]):
                runs = _runs(seq_id[row])
                assert [int(seq_id[row, s]) for s, _ in runs] == list(range(len(runs)))
                for s, e in runs:
                    ends = (
                        batch.targets["sequence"][row, s],
                        batch.targets["sequence"][row, e - 1],
                    )
                    fragment = not ({int(x) for x in ends} & {SEQUENCE_BOS, SEQUENCE_EOS})
                    assert ends == (SEQUENCE_BOS, SEQUENCE_EOS) or fragment
                    assert batch.inputs["positions"][row, s:e].tolist() == list(range(e - s))


def test_a_batch_is_a_pure_function_of_seed_rank_step_and_data_index(token_setup):
    cfg, ds = token_setup
    b0 = BatchBuilder(cfg, ds, rank=0, per_rank=256)
    first = b0.build(5, 9)
    b0.build(1, 2)  # building other batches in between changes nothing
    assert _same(first, b0.build(5, 9))
    assert _same(first, BatchBuilder(cfg, ds, rank=0, per_rank=256).build(5, 9))
    assert not _same(first, BatchBuilder(cfg, ds, rank=1, per_rank=256).build(5, 9))
    assert not _same(first, b0.build(5, 10))  # a rollback skips to another data index
    reseeded = replace(cfg, seed=1)
    assert not _same(first, BatchBuilder(reseeded, ds, rank=0, per_rank=256).build(5, 9))
    # a worker process builds exactly what the training process would
    inproc = list(batches(b0, 2, 6, 7, workers=0))
    viaworker = list(batches(b0, 2, 6, 7, workers=1, prefetch=2))
    assert [b.data_step for b in viaworker] == [9, 10, 11, 12]
    assert all(_same(a, b) for a, b in zip(inproc, viaworker, strict=True))


def test_the_stream_of_draws_is_prefix_stable(token_setup):
    cfg, ds = token_setup
    sampler = BatchBuilder(cfg, ds, rank=0, per_rank=256).sampler(1)
    n = 3 * CHUNK + 5
    stream = [d for _, d in zip(range(n), draw_stream(sampler, 4), strict=False)]
    assert [d for _, d in zip(range(10), draw_stream(sampler, 4), strict=False)] == stream[:10]
    # chunk 0 is the sample-counted draw of CHUNK samples; later chunks are new draws
    at = sampler.sample_at(4, CHUNK)
    assert stream[:CHUNK] == list(zip(at.dataset.tolist(), at.member.tolist(), strict=True))
    assert stream[CHUNK : 2 * CHUNK] != stream[:CHUNK]
    other = [d for _, d in zip(range(n), draw_stream(sampler, 5), strict=False)]
    assert other != stream


def test_fill_rows_first_fit_stops_at_the_target_reading_lazily():
    read = []

    def lengths(ns):
        for n in ns:
            read.append(n)
            yield n

    # 6 placed; 6 finds no room below the target (skipped); 3 fills 9 of 10; 4 does not
    # fit at >= 90%: stop there, the 5 after it never read
    assert fill_rows(lengths([6, 6, 3, 4, 5]), rows=1, width=10) == [[0, 2]]
    assert read == [6, 6, 3, 4]
    read.clear()
    # two rows of 8: first fit; full rows stop the reading at once
    assert fill_rows(lengths([5, 4, 3, 4, 9, 1]), rows=2, width=8) == [[0, 2], [1, 3]]
    assert read == [5, 4, 3, 4]
    # the data runs out before the target: what was placed is kept
    assert fill_rows(iter([2, 3]), rows=2, width=8) == [[0, 1], []]


def _digest(b: TrainBatch) -> str:
    """Integer and boolean tensors of a batch (coordinates left out: float noise)."""
    h = hashlib.sha256()
    for group in (b.inputs, b.targets, b.loss_masks):
        for k in sorted(group):
            if not group[k].dtype.is_floating_point:
                h.update(k.encode())
                h.update(group[k].contiguous().numpy().tobytes())
    return h.hexdigest()


@pytest.mark.parametrize(
    "pack, key, digest, shape, tokens",
    [
        (
            False,
            (1, 1),
            "763f3c63bba79c164502e6d502e503e84bc38ec1e989909a443e9aa6ce609faf",
            64,
            189,
        ),
        (
            True,
            (6, 9),
            "8085c7a9a9393978d069e57bfc7be6c9878df23713a4924c0123ec8270742cd7",
            128,
            350,
        ),
    ],
)
def test_sample_counted_batches_are_unchanged(
    tmp_path, train_data, pack, key, digest, shape, tokens
):
    """Digests recorded from the loader before token-counted batches existed; re-recorded
    once when the token ids became esm's (shapes and token counts as before)."""
    cfg = load_config(
        write_config(tmp_path / "c.toml", train_data), [f"data.pack={str(pack).lower()}"]
    )
    b = BatchBuilder(cfg, load_datasets(cfg, "/"), rank=1, per_rank=3).build(*key)
    assert (tuple(b.inputs["sequence"].shape), b.n_tokens) == ((3, shape), tokens)
    assert _digest(b) == digest


def test_packed_samples_do_not_see_each_other(token_setup):
    """Changing one packed sample (tokens and coordinates) leaves the logits of the other
    samples of its row as they were; its own change. (SDPA's mask on CPU; the xformers
    path's block lengths are checked against the samples.)"""
    cfg, ds = token_setup
    torch.manual_seed(0)
    model = ESM3(cfg.model_config()).eval()
    batch = BatchBuilder(cfg, ds, rank=0, per_rank=512).build(4, 4)  # stage "all": 128
    row = next(r for r in range(4) if len(_runs(batch.inputs["sequence_id"][r])) >= 3)
    runs = _runs(batch.inputs["sequence_id"][row])
    s, e = runs[1]
    changed = {k: v.clone() for k, v in batch.inputs.items()}
    gen = torch.Generator().manual_seed(1)
    changed["sequence"][row, s + 1 : e - 1] = torch.randint(4, 24, (e - s - 2,), generator=gen)
    changed["coords"][row, s:e] = torch.randn(e - s, 3, 3, generator=gen) * 10
    with torch.no_grad():
        a = model(**batch.inputs).logits
        b = model(**changed).logits
    for t in a:
        for i, (rs, re) in enumerate(runs):
            same = torch.allclose(a[t][row, rs:re], b[t][row, rs:re], rtol=0, atol=1e-6)
            assert same == (i != 1), (t, i)
        # other rows are other sequences too
        assert torch.equal(a[t][row + 1 :], b[t][row + 1 :]) and torch.equal(a[t][:row], b[t][:row])
    # xformers (GPU) takes the blocks from runs of equal ids: one per sample, one per padding
    blocks = []
    for r in range(batch.inputs["sequence_id"].shape[0]):
        samples = _runs(batch.inputs["sequence_id"][r])
        blocks += [e - s for s, e in samples]
        pad = 128 - sum(e - s for s, e in samples)
        blocks += [pad] if pad else []
    assert _seqlens(batch.inputs["sequence_id"]) == blocks


def test_exactly_one_of_batch_size_and_batch_tokens(tmp_path, train_data):
    path = write_config(tmp_path / "c.toml", train_data)
    both = "set exactly one of data.batch_size .* and data.batch_tokens"
    with pytest.raises(ConfigError, match=both + r".*got batch_size=4, batch_tokens=512$"):
        load_config(path, ["data.batch_tokens=512"])
    with pytest.raises(ConfigError, match=both + ".*got batch_size=0, batch_tokens=0$"):
        load_config(path, ["data.batch_size=0"])
    with pytest.raises(ConfigError, match="'data.batch_tokens': must be >= 0, got -512"):
        load_config(path, ["data.batch_size=0", "data.batch_tokens=-512"])
    with pytest.raises(
        ConfigError,
        match=r"'data.batch_tokens': 200 tokens per step is not a whole number of rows of "
        r"stages\[0\].context_length 64$",
    ):
        load_config(path, ["data.batch_size=0", "data.batch_tokens=200"])
    cfg = load_config(path, TOKENS)
    assert cfg.check_world_size(4) == 128  # 2 rows of 64, 1 of 128
    with pytest.raises(
        TrainConfigError,
        match=r"'data.batch_tokens': 512 tokens per step over the world size 8 .* not a whole "
        r"number of rows of stages\[1\].context_length 128 per rank; use a multiple of 1024$",
    ):
        cfg.check_world_size(8)
    with pytest.raises(TrainConfigError, match="world size 3 .* stages\\[0\\]"):
        cfg.check_world_size(3)


def test_memory_checks_count_the_tokens_of_a_step():
    """1.4B: 1,572,864 tokens over 32 ranks is the same per-rank load as 768 rows of 2048,
    and a batch too large for a rank names data.batch_tokens."""
    cfg = load_config("esm3_1.4b")
    assert (cfg.data.batch_tokens, cfg.data.batch_size) == (1_572_864, 0)
    assert cfg.check_world_size(32) == 24 * 2048
    rows = load_config("esm3_1.4b", ["data.batch_tokens=0", "data.batch_size=768"])
    assert cfg.min_step_bytes(32) == rows.min_step_bytes(32)
    assert cfg.min_step_bytes(64) < cfg.min_step_bytes(32)
    big = load_config("esm3_1.4b", [f"data.batch_tokens={2**40}"])
    with pytest.raises(
        ConfigError,
        match=r"^config key 'data.batch_tokens': 1099511627776 tokens per step over 32 rank\(s\) "
        r"need at least .* lower data.batch_tokens or the context length",
    ):
        check_memory(big, load_profile("site-example"), world_size=32, tasks_per_node=8)
