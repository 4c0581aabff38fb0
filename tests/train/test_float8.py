"""FP8 through torchao (esm3.train.float8): which layers are converted, the numbers of the
converted blocks, and the one-line errors where it cannot run. torchao's float8 runs on a
CPU too (torch._scaled_mm), so the conversion is tested here; the GPU check times it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

from esm3.model.config import preset
from esm3.model.esm3 import ESM3
from esm3.train import float8
from esm3.train.config import ParallelConfig, TrainConfigError
from esm3.train.parallel import parallelize
from jobs.config import ConfigError
from jobs.train.config import load_config

HAS_TORCHAO = importlib.util.find_spec("torchao") is not None
CONFIG_1_4B = Path(__file__).resolve().parents[2] / "jobs/configs/train/esm3_1.4b.toml"


def _model() -> ESM3:
    torch.manual_seed(0)
    return ESM3(preset("tiny", d_model=128, n_layers=2, geom_heads=4), device="cpu")


def _batch(B=1, T=16):  # small: torch._scaled_mm on a CPU is a slow reference
    g = torch.Generator().manual_seed(0)
    seq = torch.randint(5, 25, (B, T), generator=g)
    coords = torch.randn(B, T, 3, 3, generator=g) * 10
    return {"sequence": seq, "coords": coords}


def test_candidates_keep_geometric_and_odd_sized_layers():
    m = _model()
    m.layers[1].attn.out = nn.Linear(128, 120, bias=False)  # 120 is not a multiple of 16
    convert, keep = float8.fp8_candidates(m.layers)
    block0, block1 = m.layers
    want = [block0.attn.qkv, block0.attn.out, block0.ffn.w12, block0.ffn.w3,
            block1.attn.qkv, block1.ffn.w12, block1.ffn.w3]  # fmt: skip
    assert [id(x) for x in convert] == [id(x) for x in want]
    # geometric attention's projections (4 heads: 128 -> 60, 12 -> 128) and the odd layer
    assert {id(x) for x in keep} == {id(block0.geom.proj), id(block0.geom.out), id(block1.attn.out)}


@pytest.mark.skipif(not HAS_TORCHAO, reason="torchao not installed (pip install torchao==0.17.0)")
def test_converted_blocks_match_torch_within_fp8_error_and_train():
    from torchao.float8.float8_linear import Float8Linear

    ref = _model()
    m = _model()
    assert float8.convert_blocks(m) == (8, 2)
    assert isinstance(m.layers[0].attn.qkv, Float8Linear)
    assert type(m.layers[0].geom.proj) is nn.Linear  # float32 geometry stays
    assert all(type(x) is nn.Linear for x in m.heads.modules() if isinstance(x, nn.Linear))
    with torch.no_grad():
        a = ref(**_batch()).embeddings
        b = m(**_batch()).embeddings
    rel = ((a - b).norm() / a.norm()).item()
    # E4M3 keeps 3 mantissa bits: a relative error of a few percent, not zero, not 1
    assert 1e-4 < rel < 0.1, rel
    out = m(**_batch())
    out.logits["sequence"].logsumexp(-1).mean().backward()
    grad = m.layers[0].attn.qkv.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_cpu_is_refused_with_the_key_and_the_fix():
    reason = float8.unavailable_reason(torch.device("cpu"))
    if HAS_TORCHAO:
        assert reason == "needs a CUDA GPU with compute capability >= 8.9, the device is cpu"
    else:
        assert reason == "torchao is not installed (pip install 'torchao==0.17.0')"
    with pytest.raises(TrainConfigError) as e:
        parallelize(_model(), ParallelConfig(fp8=True), torch.device("cpu"), distributed=False)
    msg = str(e.value)
    assert msg.startswith("config key 'parallel.fp8': FP8 with model.linear = 'torch' uses ")
    assert reason in msg and "model.linear = 'te'" in msg and "\n" not in msg


def test_config_routes_fp8_to_te_or_torchao():
    te = load_config(CONFIG_1_4B)
    assert (te.model.linear, te.parallel.fp8, te.model_config().backend.fp8) == ("te", True, True)
    ao = load_config(CONFIG_1_4B, ["model.linear=torch"])  # valid: torchao's FP8
    assert ao.parallel.fp8 and ao.model_config().backend.fp8 is False
    te_model = _model()
    te_model.cfg = preset("tiny", backend=te.model_config().backend)
    assert float8.apply(te_model, torch.device("cpu")) == (0, 0)  # TE's FP8: its autocast


def test_fp8_on_the_vqvae_is_a_config_error():
    vq = Path(__file__).resolve().parents[2] / "jobs/configs/train/vqvae_stage1.toml"
    with pytest.raises(ConfigError, match=r"parallel.fp8': FP8 is for the ESM3 transformer"):
        load_config(vq, ["parallel.fp8=true"])


@pytest.mark.skipif(not HAS_TORCHAO, reason="torchao not installed (pip install torchao==0.17.0)")
def test_parallelize_composes_float8_checkpointing_and_fsdp(process_group, monkeypatch):
    """parallelize's order on CUDA (float8, then checkpointing, then fully_shard), run on
    the CPU with the device check lifted; two training steps stay finite."""
    from torchao.float8.float8_linear import Float8Linear

    monkeypatch.setattr(float8, "require", lambda device: None)
    cfg = ParallelConfig(precision="bf16", fp8=True, activation_checkpointing=True)
    m, _ = parallelize(_model(), cfg, torch.device("cpu"))
    assert sum(isinstance(x, Float8Linear) for x in m.modules()) == 8
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    for _ in range(2):
        loss = m(**_batch()).logits["sequence"].float().logsumexp(-1).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        assert torch.isfinite(loss)
