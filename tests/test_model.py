"""The ESM3 model: sizes, invariances, masking across chains and packed sequences, losses."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from esm3.model import backends as bk
from esm3.model.config import PRESETS, BackendConfig, flops_per_token, param_count, preset
from esm3.model.esm3 import ESM3
from esm3.model.geometry import GeometricAttention, backbone_frames, geometric_bias
from esm3.model.loss import LossConfig, track_losses
from esm3.tokenize.annotations import FIRST_LABEL, NONE
from esm3.tokenize.sequence import encode_sequence
from esm3.tokenize.specials import PAD, SEQUENCE_BOS, SEQUENCE_EOS, SEQUENCE_PAD
from tests.test_tasks_augment import real_protein

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _rotation(seed: int) -> torch.Tensor:
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return torch.tensor(q, dtype=torch.float32)


def _real_inputs(name: str = "5PTI.cif.gz", chain: int = 0):
    p = real_protein(name, chain)
    seq = torch.tensor(
        np.concatenate([[SEQUENCE_BOS], encode_sequence(p.sequence), [SEQUENCE_EOS]])
    )[None]
    co = np.concatenate([np.full((1, 3, 3), np.nan), p.coords, np.full((1, 3, 3), np.nan)])
    return seq, torch.tensor(co, dtype=torch.float32)[None]


def _tiny(**kw) -> ESM3:
    torch.manual_seed(0)
    return ESM3(preset("tiny", **kw)).eval()


def test_param_count_matches_module_and_paper_sizes():
    for cfg in (preset("tiny"), preset("inverse_folding_200m", d_model=128, d_head=32)):
        m = ESM3(cfg)
        assert param_count(cfg) == sum(p.numel() for p in m.parameters())
    # Table S1 sizes (counted from the config, not instantiated)
    for name, billions in (("esm3_1.4b", 1.4), ("esm3_7.7b", 7.7), ("esm3_98.5b", 98.5)):
        assert param_count(PRESETS[name]) / 1e9 == pytest.approx(billions, rel=0.03), name
    assert param_count(PRESETS["inverse_folding_200m"]) / 1e6 == pytest.approx(200, rel=0.05)
    assert param_count(PRESETS["bench_100m"]) / 1e6 == pytest.approx(100, rel=0.05)
    assert 1e6 < param_count(PRESETS["tiny"]) < 5e6
    c = PRESETS["esm3_1.4b"]
    assert (c.n_layers, c.d_model, c.d_head, c.context_length) == (48, 1536, 64, 2048)
    c = PRESETS["esm3_98.5b"]
    assert (c.n_layers, c.d_model, c.d_head) == (216, 6144, 128)
    kinds = PRESETS["inverse_folding_200m"].layer_kinds()
    assert kinds[:4] == ["geometric", "standard", "geometric", "standard"]
    assert PRESETS["inverse_folding_200m"].heads == ("sequence",)


def test_flops_per_token_closed_form():
    c = PRESETS["esm3_1.4b"]
    f = flops_per_token(c, 2048)
    assert f == pytest.approx(6 * 1.4e9 + 12 * 48 * 1536 * 2048, rel=0.03)


def test_frames_are_orthonormal_and_missing_residues_flagged():
    _, co = _real_inputs()
    rot, trans, present = backbone_frames(co)
    assert present[0, 0].item() is False and present[0, 1:-1].all()
    eye = torch.eye(3).expand_as(rot)
    assert torch.allclose(rot.transpose(-1, -2) @ rot, eye, atol=1e-5)
    assert torch.allclose(torch.linalg.det(rot), torch.ones(rot.shape[:2]), atol=1e-5)


def test_geometric_attention_invariant_to_rotation_and_translation():
    torch.manual_seed(0)
    seq, co = _real_inputs("adk_open.pdb")
    geo = GeometricAttention(64, 8)
    with torch.no_grad():
        geo.rot_weight.fill_(1.0)
        geo.dist_weight.fill_(1.0)
    x = torch.randn(1, seq.shape[1], 64)
    one_chain = torch.zeros(seq.shape, dtype=torch.long)

    def run(c):
        rot, trans, present = backbone_frames(c)
        return geo(x, rot, trans, present, geometric_bias(present, one_chain, None))

    out = run(co)
    moved = co @ _rotation(3).T + torch.tensor([30.0, -12.0, 7.5])
    assert torch.allclose(out, run(moved), atol=2e-4)
    assert out[0, 1:-1].abs().sum() > 0 and out[0, 0].abs().sum() == 0  # bos: no coords
    # control: a non-rigid change (one coordinate shifted) does change the output
    bent = co.clone()
    bent[0, 10:20] += torch.tensor([3.0, 0.0, 0.0])
    assert not torch.allclose(out, run(bent), atol=1e-3)


def test_model_outputs_invariant_to_rotation_and_translation():
    m = _tiny()
    seq, co = _real_inputs()
    moved = co @ _rotation(5).T + torch.tensor([-50.0, 3.0, 20.0])
    with torch.no_grad():
        a = m(seq, coords=co).logits
        b = m(seq, coords=moved).logits
    for t in a:
        assert torch.allclose(a[t], b[t], atol=1e-4), t


def test_no_information_across_chains_in_geometric_layer():
    torch.manual_seed(0)
    seq, co = _real_inputs("adk_open.pdb")
    T = seq.shape[1]
    chain = torch.zeros(1, T, dtype=torch.long)
    chain[0, 100:] = 1
    geo = GeometricAttention(64, 8)
    x = torch.randn(1, T, 64)

    def run(c, feats, chain_id):
        rot, trans, present = backbone_frames(c)
        return geo(feats, rot, trans, present, geometric_bias(present, chain_id, None))

    base = run(co, x, chain)
    co2, x2 = co.clone(), x.clone()
    co2[0, 100:] = co2[0, 100:] @ _rotation(1).T + 5.0  # move chain 2 relative to chain 1
    x2[0, 100:] = torch.randn(T - 100, 64)  # and change its features
    out = run(co2, x2, chain)
    assert torch.allclose(base[0, :100], out[0, :100], atol=1e-5)
    assert not torch.allclose(base[0, 100:], out[0, 100:], atol=1e-3)
    # control: with one chain the same perturbation reaches the first residues
    one = torch.zeros_like(chain)
    assert not torch.allclose(run(co, x, one)[0, :100], run(co2, x2, one)[0, :100], atol=1e-3)


def test_packed_rows_equal_separate_rows_and_padding_is_ignored():
    """Packed as the suite's batches pack them: a sequence id per sample (self-attention)
    and chain ids offset per sample (geometric attention, which esm confines by chain)."""
    m = _tiny()
    s1, c1 = _real_inputs("5PTI.cif.gz")
    s2, c2 = _real_inputs("1BD2.cif.gz", 1)
    with torch.no_grad():
        a = m(s1, coords=c1).logits["sequence"]
        b = m(s2, coords=c2).logits["sequence"]
        n1, n2 = s1.shape[1], s2.shape[1]
        seq = torch.cat([s1, s2, torch.full((1, 5), SEQUENCE_PAD)], dim=1)
        co = torch.cat([c1, c2, torch.full((1, 5, 3, 3), float("nan"))], dim=1)
        sid = torch.tensor([[0] * n1 + [1] * n2 + [-1] * 5])
        packed = m(seq, coords=co, sequence_id=sid, chain_id=sid).logits["sequence"]
        padded = m(
            torch.cat([s1, torch.full((1, 7), SEQUENCE_PAD)], 1),
            coords=torch.cat([c1, torch.full((1, 7, 3, 3), float("nan"))], 1),
            sequence_id=torch.tensor([[0] * n1 + [-1] * 7]),
        ).logits["sequence"]
    assert torch.allclose(packed[0, :n1], a[0], atol=1e-4)
    assert torch.allclose(packed[0, n1 : n1 + n2], b[0], atol=1e-4)
    assert torch.allclose(padded[0, :n1], a[0], atol=1e-4)


def test_missing_track_is_filled_as_esm_fills_it():
    """An absent SS8 track is all <pad>; an absent structure track is all MASK, with the
    sequence's BOS/EOS carried over as structure BOS/EOS (as esm's forward does)."""
    m = _tiny()
    seq, co = _real_inputs()
    sp = m.cfg.tracks.specials("structure")
    structure = torch.full_like(seq, sp.mask)
    structure[0, 0], structure[0, -1] = sp.bos, sp.eos
    with torch.no_grad():
        a = m(seq, coords=co).logits["sequence"]
        b = m(seq, coords=co, ss8=torch.full_like(seq, PAD), structure=structure)
        c = m(seq, coords=co, ss8=torch.full_like(seq, 3)).logits["sequence"]  # all 'G'
    assert torch.allclose(a, b.logits["sequence"], atol=1e-6)
    assert not torch.allclose(a, c, atol=1e-3)  # control: a given track does change it


def test_context_length_error_and_max_logit():
    m = _tiny(context_length=32)
    with pytest.raises(ValueError, match="input length 60 exceeds the model's context length 32"):
        m(torch.full((1, 60), 7))
    m = _tiny()
    seq, co = _real_inputs()
    out = m(seq, coords=co)
    assert out.max_attn_logit.shape == (m.cfg.n_layers,)
    assert torch.isfinite(out.max_attn_logit).all()
    # the first layer's value equals a direct computation from its q and k
    layer = m.layers[0].attn
    with torch.no_grad():
        tok = m.filled_inputs(1, seq.shape[1], seq.device, {"sequence": seq})
        x = m.embed(tok, torch.ones(1, 1), torch.zeros(seq.shape))
        q, k, _ = layer.qkv(layer.norm(x)).chunk(3, dim=-1)
        q, k = layer.q_norm(q), layer.k_norm(k)
        from esm3.model.esm3 import rotary

        pos = torch.arange(seq.shape[1])[None]
        q = rotary(q.view(1, -1, layer.n_heads, layer.d_head), pos)
        k = rotary(k.view(1, -1, layer.n_heads, layer.d_head), pos)
        ref = torch.einsum("bihd,bjhd->bhij", q, k).max() / layer.d_head**0.5
    assert out.max_attn_logit[0] == pytest.approx(ref.item(), rel=1e-4)


def test_backend_fallback_logs_one_line_each(caplog):
    with caplog.at_level(logging.WARNING, logger="esm3.model.backends"):
        b = bk.resolve(BackendConfig(attention="xformers", linear="te", fp8=True), "cpu")
    assert (b.attention, b.linear, b.fp8) == ("sdpa", "torch", False)
    assert len(caplog.records) == 3
    assert "xformers needs CUDA" in caplog.records[0].message
    with pytest.raises(ValueError, match="model.backend.attention must be sdpa or xformers"):
        BackendConfig(attention="flash")


def test_losses_per_track_match_manual_cross_entropy():
    torch.manual_seed(0)
    B, T = 2, 6
    logits = {
        "sequence": torch.randn(B, T, 64),
        "ss8": torch.randn(B, T, 11),
        "residue": torch.randn(B, T, FIRST_LABEL + 3),
    }
    targets = {
        "sequence": torch.randint(4, 29, (B, T)),
        "ss8": torch.randint(3, 11, (B, T)),
        "residue": torch.full((B, T, 16), PAD),
    }
    targets["residue"][..., 0] = NONE
    targets["residue"][0, 1, 0] = FIRST_LABEL + 1  # label 1 at one position
    masks = {k: torch.zeros(B, T, dtype=torch.bool) for k in logits}
    masks["sequence"][0, :3] = True
    masks["residue"][0, 1] = True
    total, per, counts = track_losses(
        logits, targets, masks, LossConfig({"sequence": 2.0, "ss8": 1.0, "residue": 1.0})
    )
    ref = torch.nn.functional.cross_entropy(logits["sequence"][0, :3], targets["sequence"][0, :3])
    assert per["sequence"].item() == pytest.approx(ref.item(), rel=1e-6)
    assert "ss8" not in per and counts["ss8"] == 0  # nothing masked: no loss
    hot = torch.tensor([0.0, 1.0, 0.0])
    ref_r = torch.nn.functional.binary_cross_entropy_with_logits(
        logits["residue"][0, 1, FIRST_LABEL:], hot
    )
    assert per["residue"].item() == pytest.approx(ref_r.item(), rel=1e-6)
    assert total.item() == pytest.approx(2 * ref.item() + ref_r.item(), rel=1e-6)
