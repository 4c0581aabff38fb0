"""Backends agree on a GPU: SDPA vs xformers, torch vs TransformerEngine, BF16 and FP8."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from esm3.model.config import BackendConfig, preset
from esm3.model.esm3 import ESM3

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _batch(B=2, T=128, device="cuda"):
    g = torch.Generator().manual_seed(0)
    seq = torch.randint(5, 30, (B, T), generator=g)
    co = torch.randn(B, T, 3, 3, generator=g) * 10
    sid = torch.zeros(B, T, dtype=torch.long)
    sid[:, T // 2 :] = 1  # two packed sequences per row
    return seq.to(device), co.to(device), sid.to(device)


def _model(backend: BackendConfig, state=None):
    torch.manual_seed(0)
    m = ESM3(preset("tiny", d_model=256, d_head=64, backend=backend), device="cuda").cuda()
    if state is not None:
        m.load_state_dict(state, strict=False)
    return m.eval()


def test_xformers_matches_sdpa_on_packed_rows():
    if importlib.util.find_spec("xformers") is None:
        pytest.skip("xformers not installed")
    seq, co, sid = _batch()
    ref = _model(BackendConfig())
    alt = _model(BackendConfig(attention="xformers"), ref.state_dict())
    assert alt.backends.attention == "xformers"
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        a = ref(seq, coords=co, sequence_id=sid).logits["sequence"].float()
        b = alt(seq, coords=co, sequence_id=sid).logits["sequence"].float()
    assert torch.allclose(a, b, atol=5e-2, rtol=5e-2)


def test_bf16_close_to_fp32():
    seq, co, sid = _batch()
    m = _model(BackendConfig())
    with torch.no_grad():
        a = m(seq, coords=co, sequence_id=sid).logits["sequence"]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            b = m(seq, coords=co, sequence_id=sid).logits["sequence"].float()
    assert torch.allclose(a, b, atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("fp8", [False, True])
def test_transformer_engine_runs_and_trains(fp8):
    if importlib.util.find_spec("transformer_engine") is None:
        pytest.skip("transformer_engine not installed")
    if fp8 and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("FP8 needs Hopper")
    seq, co, sid = _batch()
    m = _model(BackendConfig(linear="te", fp8=fp8)).train()
    assert m.backends.linear == "te" and m.backends.fp8 == fp8
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = m(seq, coords=co, sequence_id=sid)
    loss = out.logits["sequence"].float().logsumexp(-1).mean()
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in m.parameters())
