"""BF16 mixed precision (FSDP2's MixedPrecisionPolicy) and activation checkpointing on CPU:
the training loop over two real gloo ranks, as a GPU run takes it (bf16 gathered parameters
and activations, fp32 reductions, fp32 master weights), against the same run in FP32 and
with every block's activations recomputed in backward."""

from __future__ import annotations

import hashlib
import logging
import pickle
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from esm3.model.config import preset
from esm3.model.esm3 import ESM3, Block
from esm3.train.config import ParallelConfig
from esm3.train.data import BatchBuilder, BatchSource, load_datasets
from esm3.train.loss import ESM3Loss
from esm3.train.parallel import parallelize, resolve_precision
from esm3.train.trainer import Sinks, Trainer, esm3_train_model
from jobs.train.config import load_config
from tests.ranks import exit_rank, spawn_two_ranks
from tests.train.conftest import write_config

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # FSDP's view-output notice

# (precision, activation checkpointing) of each run; the same seed, data and steps
RUNS = {
    "fp32": ("fp32", False),
    "bf16": ("bf16", False),
    "fp32_ac": ("fp32", True),
    "bf16_ac": ("bf16", True),
}
STEPS = 4  # three sequence-only steps, then one with structures (geometric attention)
N_BLOCKS = 2  # write_config's n_layers
CPU = torch.device("cpu")


@dataclass
class Observed:
    """What one rank saw during a run."""

    block_calls: int = 0
    block_dtypes: set = field(default_factory=set)  # (input, output) dtypes of the blocks
    logit_dtypes: set = field(default_factory=set)
    loss_dtypes: set = field(default_factory=set)
    collectives: dict = field(default_factory=dict)  # FSDP collective -> tensor dtypes
    grads: set = field(default_factory=set)  # (type, dtype) of the gradients stepped on
    grad_digests: list = field(default_factory=list)  # per step: this rank's gradient bits
    params: set = field(default_factory=set)  # (type, dtype) of the trained parameters
    optim_states: set = field(default_factory=set)
    losses: dict = field(default_factory=dict)
    rows: list = field(default_factory=list)

    def block_starts(self, module, args) -> None:
        # counted where a forward starts: a recomputation stops early (once backward's
        # tensors are back), so a forward hook would miss it
        self.block_calls += 1

    def block(self, module, args, output) -> None:
        self.block_dtypes.add((args[0].dtype, output.dtype))

    def step(self, optimizer, args, kwargs) -> None:
        grads = [p.grad for g in optimizer.param_groups for p in g["params"]]
        self.grads |= {(type(g).__name__, g.dtype) for g in grads}
        local = torch.cat([g.to_local().flatten() for g in grads])
        self.grad_digests.append(hashlib.sha256(local.numpy().tobytes()).hexdigest())


def _record_collectives() -> dict[str, set]:
    """Wrap the collectives FSDP2 calls (through the module's attributes) to note their
    tensors' dtypes in the dict returned (collective name -> dtypes)."""
    seen: dict[str, set] = {}
    for name in ("all_gather_single", "reduce_scatter_single"):
        orig = getattr(dist, name)

        def wrapped(*args, _orig=orig, _name=name, **kwargs):
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
            seen.setdefault(_name, set()).update(t.dtype for t in tensors)
            return _orig(*args, **kwargs)

        setattr(dist, name, wrapped)
    return seen


def _observed_run(cfg, datasets, rank: int, ckpt_dir: str) -> Observed:
    seen = Observed()
    model = esm3_train_model(cfg, CPU, distributed=True)
    for m in model.module.modules():
        if isinstance(m, Block):  # the block itself, inside any checkpoint wrapper
            m.register_forward_pre_hook(seen.block_starts)
            m.register_forward_hook(seen.block)
    base = ESM3Loss(cfg.loss_weights)

    def loss_fn(out, batch):
        res = base(out, batch)
        seen.logit_dtypes |= {lg.dtype for lg in out.logits.values()}
        seen.loss_dtypes.add(res.loss.dtype)
        return res

    data = BatchSource(BatchBuilder(cfg, datasets, rank=rank, per_rank=cfg.check_world_size(2)))
    trainer = Trainer(cfg, model, loss_fn, data, run_id="mp", ckpt_dir=ckpt_dir, device=CPU,
                      sinks=Sinks(seen.rows.append), max_steps=STEPS)  # fmt: skip
    trainer.optimizer.register_step_pre_hook(seen.step)
    seen.losses = trainer.run().losses
    seen.params = {(type(p).__name__, p.dtype) for p in trainer.params}
    seen.optim_states = {
        v.dtype for s in trainer.optimizer.state.values() for v in s.values() if v.dim() > 0
    }
    return seen


def _runs_on_rank(rank: int, store: str, cfg, data_root: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=2, timeout=timedelta(minutes=1)
    )
    try:
        datasets = load_datasets(cfg, data_root)
        collectives = _record_collectives()
        got = {}
        for name, (precision, ac) in RUNS.items():
            parallel = replace(cfg.parallel, precision=precision, activation_checkpointing=ac)
            collectives.clear()
            got[name] = _observed_run(
                replace(cfg, parallel=parallel), datasets, rank, f"{out}.{name}.ck"
            )
            got[name].collectives = {k: set(v) for k, v in collectives.items()}
        with open(f"{out}.{rank}", "wb") as f:
            pickle.dump(got, f)
    finally:
        dist.destroy_process_group()
    exit_rank()


@pytest.fixture(scope="module")
def runs(tmp_path_factory, train_data) -> list[dict[str, Observed]]:
    """Every run of RUNS on two gloo ranks (one spawn for all); each rank's observations."""
    tmp = tmp_path_factory.mktemp("mixed-precision")
    cfg = load_config(write_config(tmp / "c.toml", train_data), ["checkpoint.every=0"])
    load_datasets(cfg, train_data)  # the ad-hoc stores, written here once, read by the ranks
    out = str(tmp / "out")
    spawn_two_ranks(_runs_on_rank, (str(tmp / "store"), cfg, str(train_data), out), 240)
    return [pickle.loads(Path(f"{out}.{r}").read_bytes()) for r in range(2)]


def test_bf16_computes_in_bf16_reduces_and_keeps_weights_in_fp32(runs):
    for rank in runs:
        bf16, fp32 = rank["bf16"], rank["fp32"]
        assert bf16.block_dtypes == {(torch.bfloat16, torch.bfloat16)}
        assert fp32.block_dtypes == {(torch.float32, torch.float32)}
        # the loss in fp32 from bf16 logits
        assert bf16.logit_dtypes == {torch.bfloat16} and bf16.loss_dtypes == {torch.float32}
        # parameters gathered in bf16, gradients reduce-scattered in fp32 into fp32 shards
        assert bf16.collectives == {
            "all_gather_single": {torch.bfloat16},
            "reduce_scatter_single": {torch.float32},
        }
        assert fp32.collectives == {
            "all_gather_single": {torch.float32},
            "reduce_scatter_single": {torch.float32},
        }
        for run in (bf16, fp32):
            assert run.grads == {("DTensor", torch.float32)}
            assert run.params == {("DTensor", torch.float32)}  # the master weights
            assert run.optim_states == {torch.float32}


def test_bf16_losses_differ_from_fp32_within_bf16_precision(runs):
    """BF16 rounds activations to 8 significant bits (eps 2^-7 = 7.8e-3); the loss, a mean
    over hundreds of positions, averages those errors out, so after a few steps BF16's loss
    stays within one bf16 eps of FP32's, relatively. Measured (tiny model, 4 steps): 1.6e-5,
    1.4e-4, 6.6e-5, 1.4e-5 relative. Casting the blocks' float32 geometric context
    to bf16 (FSDP's input cast) skipped every update: 3.6% off at step 2."""
    bf16, fp32 = runs[0]["bf16"], runs[0]["fp32"]
    assert sorted(bf16.losses) == list(range(1, STEPS + 1))
    assert not any(r["skipped"] for r in bf16.rows)  # every gradient finite, every update made
    print("BF16 vs FP32 relative loss gap per step:",
          {s: f"{abs(bf16.losses[s] / v - 1):.2g}" for s, v in fp32.losses.items()})  # fmt: skip
    for step, loss in fp32.losses.items():
        assert bf16.losses[step] != loss, step  # really computed in another precision
        assert bf16.losses[step] == pytest.approx(loss, rel=torch.finfo(torch.bfloat16).eps)
    assert runs[1]["bf16"].losses == bf16.losses  # every rank reports the world's loss


def test_activation_checkpointing_recomputes_each_block_and_changes_no_bit(runs):
    """With activation checkpointing each block's forward runs twice a step (once in
    forward, once recomputed in backward). The recomputation repeats the same CPU kernels
    on the same inputs (the blocks draw no random numbers), so gradients, losses and
    gradient norms equal the run without it to the bit, in FP32 and in BF16 under FSDP."""
    for rank in runs:
        for precision in ("fp32", "bf16"):
            plain, ac = rank[precision], rank[f"{precision}_ac"]
            assert plain.block_calls == N_BLOCKS * STEPS
            assert ac.block_calls == 2 * N_BLOCKS * STEPS
            assert ac.block_dtypes == plain.block_dtypes  # recomputed in the same precision
            assert len(ac.grad_digests) == STEPS and ac.grad_digests == plain.grad_digests
            assert ac.losses == plain.losses
            assert [r["grad_norm"] for r in ac.rows] == [r["grad_norm"] for r in plain.rows]


# --- without a process group ------------------------------------------------------------


def _tiny_esm3() -> ESM3:
    torch.manual_seed(0)
    return ESM3(preset("tiny", d_model=64, n_layers=N_BLOCKS, d_head=32, context_length=32))


def _grads_and_calls(model: ESM3) -> tuple[dict[str, torch.Tensor], int]:
    """Gradients of a loss over every head after one forward/backward on fixed inputs with
    coordinates (geometric attention on), and how often the blocks' forwards ran."""
    calls = []
    for m in model.modules():
        if isinstance(m, Block):
            m.register_forward_pre_hook(lambda *_: calls.append(1))
    gen = torch.Generator().manual_seed(1)
    seq = torch.randint(4, 24, (2, 32), generator=gen)
    coords = torch.randn(2, 32, 3, 3, generator=gen) * 10
    out = model(sequence=seq, coords=coords)
    loss = sum(lg.float().logsumexp(-1).mean() for lg in out.logits.values())
    loss.backward()
    grads = {
        n.replace("_checkpoint_wrapped_module.", ""): p.grad for n, p in model.named_parameters()
    }
    return grads, len(calls)


def test_activation_checkpointing_alone_recomputes_and_equals_to_the_bit(caplog):
    plain, plain_calls = _grads_and_calls(_tiny_esm3())
    with caplog.at_level(logging.INFO, logger="esm3.train.parallel"):
        model, precision = parallelize(
            _tiny_esm3(), ParallelConfig(activation_checkpointing=True), CPU, distributed=False
        )
    assert f"activation checkpointing on {N_BLOCKS} blocks" in caplog.text
    ac, ac_calls = _grads_and_calls(model)
    assert (plain_calls, ac_calls) == (N_BLOCKS, 2 * N_BLOCKS)
    assert sorted(ac) == sorted(plain)
    for name, g in plain.items():
        assert torch.equal(ac[name], g), name


def test_precision_resolution_and_bf16_without_fsdp(caplog):
    cuda = torch.device("cuda")
    assert resolve_precision(ParallelConfig(), CPU) == "fp32"  # auto
    assert resolve_precision(ParallelConfig(), cuda) == "bf16"
    assert resolve_precision(ParallelConfig(precision="bf16"), CPU) == "bf16"  # asked: honoured
    assert resolve_precision(ParallelConfig(precision="fp32"), cuda) == "fp32"
    # BF16 is FSDP's policy: without a process group the model runs FP32, and says so
    with caplog.at_level(logging.WARNING, logger="esm3.train.parallel"):
        _, precision = parallelize(
            _tiny_esm3(), ParallelConfig(precision="bf16"), CPU, distributed=False
        )
    assert precision == "fp32" and "BF16 mixed precision needs FSDP" in caplog.text
