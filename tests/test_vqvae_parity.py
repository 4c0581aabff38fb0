"""Weight compatibility of the structure encoder with `esm`'s StructureTokenEncoder
(3.2.1.post1): the same tokens from the same weights, both ways, on real chains
(MDAnalysisTests). `esm`'s encoder cannot run in float64 (its geometric attention fills a
float32 bias with float64's minimum), so both sides run in float32; the codebook is drawn
from `esm`'s own encodings so tokens vary and sit far from ties."""

from __future__ import annotations

import pytest
import torch

from esm3.interop.esm import (
    IncompatibleWeights,
    encoder_esm_config,
    encoder_from_esm,
    encoder_to_esm,
)
from esm3.model.vqvae.config import EncoderConfig
from esm3.model.vqvae.encoder import StructureEncoder
from tests.test_tasks_augment import real_protein

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

# (d_model, v_heads, n_layers, d_out, n_codes)
SHAPES = [(64, 8, 2, 16, 64), (96, 12, 3, 24, 128)]
CHAINS = [("adk_open.pdb", 0), ("5PTI.cif.gz", 0), ("1BD2.cif.gz", 0), ("3KPR.cif.gz", 0)]


def _esm_encoder(shape: tuple[int, ...], seed: int = 0) -> torch.nn.Module:
    """esm's encoder with every weight random (esm's init leaves the geometric scales at 0
    and norms at 1, which would hide differences) and a codebook drawn from its own
    encodings of a real chain."""
    from esm.models.vqvae import StructureTokenEncoder

    d, v_heads, layers, d_out, n_codes = shape
    torch.manual_seed(seed)
    enc = StructureTokenEncoder(d_model=d, n_heads=1, v_heads=v_heads, n_layers=layers,
                                d_out=d_out, n_codes=n_codes).eval()  # fmt: skip
    with torch.no_grad():
        for p in enc.parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if p.dim() == 1 else 0.0))
        z = _esm_z(enc, _coords("adk_open.pdb", 0))[0]
        rows = z[torch.randperm(z.shape[0])[:n_codes]]
        enc.codebook.embeddings.copy_(rows)
        enc.codebook.z_avg.copy_(rows)
        enc.codebook.N.fill_(1.0)
    return enc


def _esm_z(enc: torch.nn.Module, coords: torch.Tensor) -> torch.Tensor:
    """esm's pre-quantisation vectors (B, L, d_out), read at its codebook's input."""
    seen = []
    hook = enc.codebook.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    try:
        _esm_encode(enc, coords)
    finally:
        hook.remove()
    return seen[0]


def _esm_encode(enc: torch.nn.Module, coords: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        _, codes = enc.encode(coords[None], residue_index=torch.arange(len(coords))[None])
    return codes[0]


def _coords(name: str, chain: int) -> torch.Tensor:
    return torch.tensor(real_protein(name, chain).coords, dtype=torch.float32)


def _with_gaps(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The chain with a few backbone atoms removed, and which residues keep a frame."""
    x = x.clone()
    x[3, 0] = float("nan")
    x[20, 1] = float("nan")
    x[21] = float("nan")
    return x, torch.isfinite(x).all(-1).all(-1)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"d{s[0]}-v{s[1]}-l{s[2]}")
def test_tokens_match_esm_on_real_chains(shape):
    theirs = _esm_encoder(shape)
    ours = encoder_from_esm(theirs.state_dict()).eval()
    assert ours.cfg.d_model == shape[0] and ours.cfg.geom_heads == shape[1]
    distinct = set()
    for name, chain in CHAINS:
        x = _coords(name, chain)
        mine, want = ours.tokenize(x), _esm_encode(theirs, x)
        present = torch.isfinite(x).all(-1).all(-1)
        assert torch.equal(mine[present], want[present]), name
        assert (mine[~present] == ours.mask_token).all()
        distinct |= set(mine[present].tolist())
    assert len(distinct) > shape[4] // 2


@pytest.mark.parametrize("shape", SHAPES[:1], ids=lambda s: f"d{s[0]}")
def test_frameless_residues_get_mask_where_esm_gives_a_code(shape):
    theirs = _esm_encoder(shape)
    ours = encoder_from_esm(theirs.state_dict()).eval()
    x, present = _with_gaps(_coords("adk_open.pdb", 0))
    mine, want = ours.tokenize(x), _esm_encode(theirs, x)
    assert torch.equal(mine[present], want[present])
    assert (mine[~present] == ours.mask_token).all() and (want[~present] < shape[4]).all()


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"d{s[0]}-v{s[1]}-l{s[2]}")
def test_pre_quantisation_vectors_match_esm(shape):
    theirs = _esm_encoder(shape)
    ours = encoder_from_esm(theirs.state_dict()).eval()
    x, present = _with_gaps(_coords("5PTI.cif.gz", 0))
    want = _esm_z(theirs, x)[0]
    with torch.no_grad():
        z, mine_present = ours.embed(x[None], residue_index=torch.arange(len(x))[None])
    assert torch.equal(mine_present[0], present)
    scale = want[present].abs().max()
    torch.testing.assert_close(z[0][present] / scale, want[present] / scale, rtol=0, atol=1e-5)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"d{s[0]}-v{s[1]}-l{s[2]}")
def test_encoder_to_esm_loads_strictly_and_gives_the_same_tokens(shape):
    from esm.models.vqvae import StructureTokenEncoder

    source = _esm_encoder(shape)
    ours = encoder_from_esm(source.state_dict()).eval()
    d, v_heads, layers, d_out, n_codes = shape
    back = StructureTokenEncoder(d_model=d, n_heads=1, v_heads=v_heads, n_layers=layers,
                                 d_out=d_out, n_codes=n_codes).eval()  # fmt: skip
    sd = encoder_to_esm(ours)
    back.load_state_dict(sd, strict=True)
    for k, v in source.state_dict().items():
        assert torch.equal(sd[k], v), k
    x = _coords("3KPR.cif.gz", 0)
    present = torch.isfinite(x).all(-1).all(-1)
    assert torch.equal(_esm_encode(back, x)[present], ours.tokenize(x)[present])


def _released_esm_state_dict() -> dict[str, torch.Tensor]:
    """Keys and shapes of esm's released encoder (on the meta device: no memory, no init)."""
    from esm.models.vqvae import StructureTokenEncoder

    with torch.device("meta"):
        enc = StructureTokenEncoder(d_model=1024, n_heads=1, v_heads=128, n_layers=2,
                                    d_out=128, n_codes=4096)  # fmt: skip
    return enc.state_dict()


def test_released_shape_infers_the_default_config():
    sd = _released_esm_state_dict()
    assert encoder_esm_config(sd) == EncoderConfig()
    with torch.device("meta"):
        ours = StructureEncoder(EncoderConfig())
    converted = encoder_to_esm(ours)
    assert set(converted) == set(sd)
    assert all(converted[k].shape == sd[k].shape for k in sd)


def test_missing_and_unexpected_tensors_raise_incompatible_weights():
    sd = dict(_esm_encoder(SHAPES[0]).state_dict())
    missing = {k: v for k, v in sd.items() if k != "transformer.blocks.1.ffn.3.bias"}
    with pytest.raises(IncompatibleWeights, match=r"missing 1 tensors.*ffn\.3\.bias"):
        encoder_from_esm(missing)
    with pytest.raises(IncompatibleWeights, match="1 unexpected tensors.*extra"):
        encoder_from_esm({**sd, "transformer.extra.weight": torch.zeros(1)})
    no_codebook = {k: v for k, v in sd.items() if not k.startswith("codebook.")}
    with pytest.raises(IncompatibleWeights, match="codebook.embeddings"):
        encoder_from_esm(no_codebook)
    with pytest.raises(IncompatibleWeights, match="not a StructureTokenEncoder"):
        encoder_from_esm({"encoder.sequence_embed.weight": torch.zeros(64, 8)})


def test_encoder_esm_cannot_hold_is_refused():
    ours = StructureEncoder(EncoderConfig(d_model=32, n_layers=1, geom_heads=2, d_code=8,
                                          n_codes=16, knn=8))  # fmt: skip
    with pytest.raises(IncompatibleWeights, match="knn 8"):
        encoder_to_esm(ours)


def test_short_chains_match_esm():
    theirs = _esm_encoder(SHAPES[0])
    ours = encoder_from_esm(theirs.state_dict()).eval()
    x = _coords("adk_open.pdb", 0)
    for piece in (x[50:51], x[40:50], x[100:115]):
        assert torch.equal(ours.tokenize(piece), _esm_encode(theirs, piece)), len(piece)


def test_convert_commands_carry_the_encoder_both_ways(tmp_path):
    """`esm3 convert encoder-from-esm` writes the tokens stage's encoder file from esm's
    weights (same tokens as esm); a file that is not esm's encoder is refused by name."""
    import subprocess
    import sys

    from esm.models.vqvae import StructureTokenEncoder

    from esm3.model.vqvae.tokenizer import VQVAEStructureTokenizer

    torch.manual_seed(0)
    ref = StructureTokenEncoder(d_model=64, n_heads=1, v_heads=8, n_layers=2, d_out=16, n_codes=64)
    src = tmp_path / "enc.pth"
    torch.save(ref.state_dict(), src)
    out = tmp_path / "structure-encoder.pt"
    cli = [sys.executable, "-m", "jobs.cli", "convert"]
    done = subprocess.run([*cli, "encoder-from-esm", str(src), str(out)], capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    tok = VQVAEStructureTokenizer.load(out)
    assert tok.codebook_size == 64 and tok.source == str(src.resolve())
    got = {k: v for k, v in tok.encoder.state_dict().items()}
    assert torch.equal(got["codebook.embeddings"], ref.state_dict()["codebook.embeddings"])
    torch.save({"w": torch.zeros(3)}, tmp_path / "other.pth")
    bad = subprocess.run([*cli, "encoder-from-esm", str(tmp_path / "other.pth"), str(out)],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert bad.returncode != 0 and "other.pth" in bad.stderr
