"""The model under FSDP2's BF16 parameters (MixedPrecisionPolicy, as on GPUs), run on the
CPU: inputs built in float32 (pLDDT RBFs, geometric attention's float32 math) meet BF16
weights, which plain nn.Linear refuses."""

from __future__ import annotations

import torch
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from esm3.model.config import preset
from esm3.model.esm3 import ESM3


def test_forward_and_backward_with_bf16_parameters(process_group):
    torch.manual_seed(0)
    m = ESM3(preset("tiny", d_model=64, n_layers=2, d_head=32), device="cpu")
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in m.layers:
        fully_shard(block, mp_policy=mp)
    fully_shard(m, mp_policy=mp)
    g = torch.Generator().manual_seed(0)
    seq = torch.randint(5, 25, (2, 32), generator=g)
    coords = torch.randn(2, 32, 3, 3, generator=g) * 10
    out = m(seq, coords=coords, average_plddt=torch.rand(2), per_res_plddt=torch.rand(2, 32))
    assert out.embeddings.dtype == torch.bfloat16
    out.logits["sequence"].float().logsumexp(-1).mean().backward()
    geo = m.layers[0].geom.proj.weight.grad  # geometric attention's weights are trained
    assert geo is not None and geo.dtype == torch.float32 and geo.to_local().abs().sum() > 0
