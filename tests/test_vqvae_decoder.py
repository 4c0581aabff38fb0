"""The structure tokenizer's decoder: shapes, gradients to the code vectors, packing,
special positions, the backbone head's ideal geometry, and one training step on a real
chain's atom37 coordinates with the stage-2 losses."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from esm3.interop.esm import IncompatibleWeights, to_esm_state_dict
from esm3.model.config import ModelConfig, preset
from esm3.model.esm3 import ESM3
from esm3.model.vqvae import losses as LS
from esm3.model.vqvae.config import PRESETS, DecoderConfig
from esm3.model.vqvae.decoder import (
    IDEAL_BACKBONE,
    DecoderOutput,
    StructureDecoder,
    decoder_param_count,
    gram_schmidt,
)
from esm3.tokenize.sequence import VOCAB_SIZE, encode_sequence
from esm3.tokenize.specials import structure_specials
from tests.vqvae_data import atom37_batch

D_CODE, N_CODES = 16, 64
SPECIALS = structure_specials(N_CODES)
STAGE1 = PRESETS["vqvae_tiny"].decoder
STAGE2 = replace(STAGE1, all_atom=True, inverse_folding=False)


def _decoder(cfg: DecoderConfig = STAGE1, seed: int = 0) -> StructureDecoder:
    torch.manual_seed(seed)
    return StructureDecoder(cfg, D_CODE, N_CODES, VOCAB_SIZE).eval()


def _inputs(B: int, L: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random code vectors with BOS first and EOS last in each row."""
    z_q = torch.randn(B, L, D_CODE, generator=torch.Generator().manual_seed(seed))
    special = torch.full((B, L), -1)
    special[:, 0], special[:, -1] = SPECIALS.bos, SPECIALS.eos
    return z_q, special


def _per_sample(out: DecoderOutput, rows: slice) -> list[torch.Tensor]:
    """The outputs of positions `rows` of row 0 (pairwise ones: the block rows x rows)."""
    return [
        out.backbone[0, rows], out.frames[0][0, rows], out.frames[1][0, rows],
        out.sequence_logits[0, rows], out.distogram_logits[0, rows, rows],
        out.direction_logits[0, rows, rows], out.pae_logits[0, rows, rows],
    ]  # fmt: skip


def test_output_shapes_of_both_stages():
    z_q, special = _inputs(2, 9)
    one = _decoder(STAGE1)(z_q, special)
    assert one.backbone.shape == (2, 9, 3, 3)
    assert one.frames[0].shape == (2, 9, 3, 3) and one.frames[1].shape == (2, 9, 3)
    assert one.distogram_logits.shape == (2, 9, 9, 64)
    assert one.direction_logits.shape == (2, 9, 9, 6, 16)
    assert one.pae_logits.shape == (2, 9, 9, 64)
    assert one.sequence_logits.shape == (2, 9, VOCAB_SIZE)
    assert one.atoms is None and one.plddt_logits is None
    two = _decoder(STAGE2)(z_q, special)
    assert two.atoms.shape == (2, 9, 37, 3) and two.plddt_logits.shape == (2, 9, 50)
    assert two.sequence_logits is None
    assert torch.equal(two.atoms[..., :3, :], two.backbone)  # N/CA/C from the backbone head


def test_gradients_reach_the_code_vectors_only_at_code_positions():
    z_q, special = _inputs(1, 8)
    z_q.requires_grad_(True)
    out = _decoder()(z_q, special)
    (out.backbone.square().sum() + out.distogram_logits.square().sum()).backward()
    norms = z_q.grad[0].norm(dim=-1)
    assert (norms[1:-1] > 0).all()
    assert (norms[[0, -1]] == 0).all()  # BOS and EOS read the special table


def test_packed_samples_are_independent():
    model = _decoder()
    z_q, special = _inputs(1, 14)
    special[0, 5], special[0, 6] = SPECIALS.eos, SPECIALS.bos  # sample 1: 0..5, 2: 6..10
    special[0, 11:] = SPECIALS.pad
    sid = torch.tensor([[0] * 6 + [1] * 5 + [-1] * 3])
    with torch.no_grad():
        base = model(z_q, special, sid)
        z2, s2 = z_q.clone(), special.clone()
        z2[0, 6:11] = torch.randn(5, D_CODE)
        s2[0, 8] = SPECIALS.mask
        changed = model(z2, s2, sid)
        alone = model(z_q[:, 6:11], special[:, 6:11])
    for a, b in zip(_per_sample(base, slice(0, 6)), _per_sample(changed, slice(0, 6)), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    # a packed sample decodes as it would alone (rotary positions restart per sample)
    packed = _per_sample(base, slice(6, 11))
    for a, b in zip(packed, _per_sample(alone, slice(0, 5)), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_special_positions_use_the_special_embedding():
    model = _decoder()
    z_q, special = _inputs(1, 6)
    special[0, 3] = SPECIALS.chainbreak
    x = model.embed(z_q, special)
    table = model.embed.special.weight
    torch.testing.assert_close(x[0, 0], table[SPECIALS.bos - N_CODES])
    torch.testing.assert_close(x[0, 3], table[SPECIALS.chainbreak - N_CODES])
    torch.testing.assert_close(x[0, 1], model.embed.code(z_q[0, 1]))
    with torch.no_grad():
        base = model(z_q, special).backbone
        ignored = z_q.clone()
        ignored[0, [0, 3, 5]] = 100.0  # vectors under specials are never read
        assert torch.equal(model(ignored, special).backbone, base)
        other = special.clone()
        other[0, 3] = SPECIALS.mask
        assert not torch.allclose(model(z_q, other).backbone, base)


def test_an_id_that_is_neither_a_code_nor_a_special_is_refused():
    model = _decoder()
    z_q, special = _inputs(1, 5)
    for bad in (3, N_CODES + 5, -2):
        s = special.clone()
        s[0, 2] = bad
        with pytest.raises(ValueError, match="special"):
            model(z_q, s)


def _angle(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    u, v = a - b, c - b
    return torch.rad2deg(torch.acos((u * v).sum(-1) / (u.norm(dim=-1) * v.norm(dim=-1))))


def test_the_backbone_head_places_ideal_bonds_in_any_frame():
    model = _decoder()
    g = torch.Generator().manual_seed(3)
    x = 5.0 * torch.randn(4, 50, STAGE1.d_model, generator=g)
    rot, trans, bb = model.backbone(x)
    eye = torch.eye(3).expand_as(rot)
    torch.testing.assert_close(rot.transpose(-1, -2) @ rot, eye, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.linalg.det(rot), torch.ones(4, 50), atol=1e-5, rtol=0)
    torch.testing.assert_close(bb[..., 1, :], trans)  # CA at the frame's origin
    n, ca, c = bb.unbind(-2)
    ideal = torch.tensor(IDEAL_BACKBONE)
    assert (n - ca).norm(dim=-1).sub(1.4590).abs().max() < 1e-3  # N-CA ~1.46 A
    assert (c - ca).norm(dim=-1).sub(1.5251).abs().max() < 1e-3  # CA-C ~1.52 A
    angle = _angle(ideal[0], ideal[1], ideal[2])
    assert (_angle(n, ca, c) - angle).abs().max() < 1e-2
    assert angle.item() == pytest.approx(111.1, abs=0.1)  # N-CA-C, near tetrahedral


def test_gram_schmidt_is_a_proper_rotation_for_arbitrary_vectors():
    g = torch.Generator().manual_seed(4)
    scales = torch.logspace(-3, 3, 100)[:, None]  # tiny to huge head outputs
    v1, v2 = torch.randn(2, 100, 3, generator=g) * scales
    rot = gram_schmidt(v1, v2)
    torch.testing.assert_close(torch.linalg.det(rot), torch.ones(100), atol=1e-4, rtol=0)
    # x axis opposite the first vector (esm's sign convention)
    torch.testing.assert_close(rot[..., 0], -v1 / v1.norm(dim=-1, keepdim=True), atol=1e-5, rtol=0)


def test_decoder_blocks_keep_unscaled_residuals_and_esm3_keeps_its_scaling():
    assert all(layer.scale == 1.0 for layer in _decoder().layers)
    assert ModelConfig(n_layers=9).residual_scale == pytest.approx(math.sqrt(9 / 36))
    # an unscaled ESM3 is not esm's ESM3: its weights are refused for export
    unscaled = ESM3(replace(preset("tiny"), scale_residue=False))
    with pytest.raises(IncompatibleWeights, match="unscaled residual"):
        to_esm_state_dict(unscaled)


def test_parameter_counts():
    model = _decoder(STAGE2)
    assert decoder_param_count(STAGE2, D_CODE, N_CODES, VOCAB_SIZE) == sum(
        p.numel() for p in model.parameters()
    )
    # the figures in the decoder's module docstring
    assert decoder_param_count(PRESETS["vqvae_stage1"].decoder) == 105_302_345
    assert decoder_param_count(PRESETS["vqvae_stage2"].decoder) == 615_241_642


def test_one_stage2_training_step_on_a_real_chain():
    coords, atom_mask, seq = atom37_batch("5PTI.cif.gz")
    L = coords.shape[1]
    pad = torch.full((1, 1, 37, 3), float("nan"))
    true = torch.cat([pad, coords, pad], 1)  # BOS and EOS carry no coordinates
    amask = torch.cat([torch.zeros(1, 1, 37, dtype=torch.bool), atom_mask,
                       torch.zeros(1, 1, 37, dtype=torch.bool)], 1)  # fmt: skip
    mask = amask[..., :3].all(-1)
    model = _decoder(STAGE2).train()
    z_q, special = _inputs(1, L + 2)
    z_q.requires_grad_(True)
    opt = torch.optim.Adam([*model.parameters(), z_q], lr=1e-3)
    tokens = torch.from_numpy(encode_sequence(seq, unknown="X"))[None]
    assert tokens.shape[1] == L

    def step() -> torch.Tensor:
        out = model(z_q, special)
        bb = true[..., :3, :]
        terms = [
            LS.all_atom_distance_loss(out.atoms, true, amask),
            LS.all_atom_direction_loss(out.atoms, true, amask),
            LS.backbone_distance_loss(out.backbone, bb, mask),
            LS.backbone_direction_loss(out.backbone, bb, mask),
            LS.distogram_loss(out.distogram_logits, bb, mask),
            LS.direction_bins_loss(out.direction_logits, bb, mask),
            LS.plddt_loss(out.plddt_logits, out.atoms, true, mask),
        ]
        return sum(t.value for t in terms)

    before = [p.detach().clone() for p in model.parameters()]
    loss = step()
    assert torch.isfinite(loss) and loss > 0
    opt.zero_grad()
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert torch.isfinite(z_q.grad).all() and z_q.grad[0, 1:-1].abs().sum() > 0
    opt.step()
    moved = sum(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    assert moved == len(before)
    with torch.no_grad():
        assert torch.isfinite(step())
