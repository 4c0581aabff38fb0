"""The structure tokenizer's decoder (paper A.1.7.2): quantised codes -> 3D structure.

A stack of ESM3's standard blocks (self-attention with QK LayerNorm and rotary, SwiGLU)
reads one vector per position: a code position embeds its quantised vector through
Linear(d_code -> d_model), so gradients reach the encoder straight through the codebook;
BOS/EOS/PAD/MASK/chainbreak positions embed through a table of the 5 structure specials.
As `esm`'s decoder, branch outputs join the residual unscaled and a bias-free LayerNorm
ends the stack. Heads on the normalised states:
- backbone: a Dim6Rot head (`esm`'s): per residue a translation (x10 A) and two vectors
  made into a rotation by Gram-Schmidt; `esm`'s ideal N/CA/C placed in that frame;
- pairwise (`esm`'s PairwisePredictionHead shape): distogram (64 bins), direction
  classes (6 dot products x 16 bins) and predicted aligned error (64 bins), one head;
- inverse folding (stage 1): sequence logits;
- all atom (stage 2): per-residue atom37 positions in the residue's frame (N/CA/C from
  the backbone, so the two agree) and pLDDT logits (50 bins).

Parameter counts (`decoder_param_count`, d_code 128, 4,096 codes, 64 sequence tokens):
stage 1 (d 1024, 8 layers, 16 heads, inverse folding) 105,302,345 parameters;
stage 2 (d 1280, 30 layers, 20 heads, all atom) 615,241,642.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from esm3.model import backends as bk
from esm3.model.config import BackendConfig, ModelConfig
from esm3.model.esm3 import Block, Head, _Context, _positions
from esm3.model.vqvae.atom37 import N_ATOM37
from esm3.model.vqvae.config import DecoderConfig
from esm3.tokenize.specials import N_STRUCTURE_SPECIAL

#: `esm`'s ideal backbone in a residue's frame (Angstrom): N, CA (origin), C on -x
IDEAL_BACKBONE = ((0.5256, 1.3612, 0.0), (0.0, 0.0, 0.0), (-1.5251, 0.0, 0.0))
TRANSLATION_SCALE = 10.0  # the backbone head predicts translations in nm-ish units
DISTOGRAM_BINS = 64
DIRECTION_PAIRS = 6  # dot products between CA->C, CA->N and their normal, p <= q
DIRECTION_BINS = 16
PAE_BINS = 64
PLDDT_BINS = 50
PAIR_DIM = 128  # the pairwise head's down-projection and hidden width (esm's)


def trunk_config(cfg: DecoderConfig, backend: BackendConfig | None = None) -> ModelConfig:
    """The ModelConfig of the decoder's blocks: esm's SwiGLU width (8/3 d rounded up to
    256) and no depth scaling of the residual branches."""
    if cfg.d_model % cfg.n_heads:
        raise ValueError(
            f"decoder.d_model {cfg.d_model} is not a multiple of n_heads {cfg.n_heads}"
        )
    return ModelConfig(
        name="vqvae_decoder",
        d_model=cfg.d_model,
        n_layers=cfg.n_layers,
        d_head=cfg.d_model // cfg.n_heads,
        ffn_multiple=256,
        scale_residue=False,
        track_max_logit=False,
        backend=backend or BackendConfig(),
    )


def _unit(v: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    return v / torch.sqrt((v * v).sum(-1, keepdim=True) + eps)


def gram_schmidt(v1: torch.Tensor, v2: torch.Tensor) -> torch.Tensor:
    """Rotation (..., 3, 3), axes as columns: x along -v1 (esm's sign convention), y the
    part of v2 orthogonal to x, z = x cross y. Always proper (det +1)."""
    e1 = _unit(-v1)
    e2 = _unit(v2 - (e1 * v2).sum(-1, keepdim=True) * e1)
    return torch.stack([e1, e2, torch.cross(e1, e2, dim=-1)], dim=-1)


def place(rot: torch.Tensor, trans: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """Points given in each residue's frame -> global. rot (..., 3, 3), trans (..., 3),
    local (..., A, 3) or (A, 3) -> (..., A, 3)."""
    return torch.einsum("...xy,...ay->...ax", rot, local) + trans[..., None, :]


class BackboneHead(nn.Module):
    """Dim6Rot: a residue's state -> its frame and ideal N/CA/C placed in that frame."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.net = Head(d_model, 9)
        self.register_buffer("ideal", torch.tensor(IDEAL_BACKBONE), persistent=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        trans, v1, v2 = self.net(x).float().split(3, dim=-1)
        rot = gram_schmidt(v1, v2)
        trans = trans * TRANSLATION_SCALE
        return rot, trans, place(rot, trans, self.ideal)


class PairwiseHead(nn.Module):
    """(B, L, d) -> (B, L, L, n_out): pair (i, j) reads [q_i * k_j, q_i - k_j] of a
    down-projection, then Linear, GELU, LayerNorm, Linear (esm's pairwise head, bias-free)."""

    def __init__(self, d_model: int, n_out: int, width: int = PAIR_DIM) -> None:
        super().__init__()
        self.down = nn.Linear(d_model, width, bias=False)
        self.net = nn.Sequential(
            nn.Linear(width, width, bias=False), nn.GELU(), nn.LayerNorm(width),
            nn.Linear(width, n_out, bias=False),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k = self.down(x).chunk(2, dim=-1)
        pair = torch.cat([q[:, :, None] * k[:, None], q[:, :, None] - k[:, None]], dim=-1)
        return self.net(pair)


class InputEmbedding(nn.Module):
    """Code positions: Linear(z_q); special positions: the special's embedding."""

    def __init__(self, d_code: int, d_model: int, n_codes: int) -> None:
        super().__init__()
        self.n_codes = n_codes
        self.code = nn.Linear(d_code, d_model)
        self.special = nn.Embedding(N_STRUCTURE_SPECIAL, d_model)

    def forward(self, z_q: torch.Tensor, special: torch.Tensor) -> torch.Tensor:
        is_code = special < 0
        top = self.n_codes + N_STRUCTURE_SPECIAL
        bad = ~is_code & ((special < self.n_codes) | (special >= top))
        if bool((special < -1).any() or bad.any()):
            raise ValueError(
                f"special must be -1 (a code) or a structure special id in [{self.n_codes}, {top})"
            )
        specials = self.special((special - self.n_codes).clamp(min=0))
        # where() keeps z_q's gradient at code positions only
        return torch.where(is_code[..., None], self.code(z_q).to(specials.dtype), specials)


@dataclass
class DecoderOutput:
    """backbone (B, L, 3, 3) N/CA/C Angstrom; frames (rot (B, L, 3, 3) with axes as columns,
    trans (B, L, 3) = CA); distogram_logits (B, L, L, 64); direction_logits
    (B, L, L, 6, 16); pae_logits (B, L, L, 64); embeddings (B, L, d_model) after the final
    norm; sequence_logits (B, L, vocab) with inverse folding; atoms (B, L, 37, 3) atom37
    Angstrom and plddt_logits (B, L, 50) with all_atom (else None)."""

    backbone: torch.Tensor
    frames: tuple[torch.Tensor, torch.Tensor]
    distogram_logits: torch.Tensor
    direction_logits: torch.Tensor
    pae_logits: torch.Tensor
    embeddings: torch.Tensor
    sequence_logits: torch.Tensor | None = None
    atoms: torch.Tensor | None = None
    plddt_logits: torch.Tensor | None = None


class StructureDecoder(nn.Module):
    """Quantised code vectors (+ specials) -> backbone, pairwise logits and optional
    sequence / all-atom / pLDDT outputs. See the module docstring."""

    def __init__(
        self,
        cfg: DecoderConfig,
        d_code: int,
        n_codes: int,
        vocab_size: int,
        backend: BackendConfig | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        trunk = trunk_config(cfg, backend)
        self.backends = bk.resolve(trunk.backend, device)
        d = cfg.d_model
        self.embed = InputEmbedding(d_code, d, n_codes)
        self.layers = nn.ModuleList(
            Block(trunk, "standard", self.backends) for _ in range(cfg.n_layers)
        )
        self.norm = nn.LayerNorm(d, bias=False)
        self.backbone = BackboneHead(d)
        n_pair = DISTOGRAM_BINS + DIRECTION_PAIRS * DIRECTION_BINS + PAE_BINS
        self.pairwise = PairwiseHead(d, n_pair, cfg.pair_dim)
        self.sequence = Head(d, vocab_size) if cfg.inverse_folding else None
        self.atoms = Head(d, N_ATOM37 * 3) if cfg.all_atom else None
        self.plddt = Head(d, PLDDT_BINS) if cfg.all_atom else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(
        self, z_q: torch.Tensor, special: torch.Tensor, sequence_id: torch.Tensor | None = None
    ) -> DecoderOutput:
        """z_q (B, L, d_code) quantised vectors (ignored at special positions); special
        (B, L) int64: the structure special id, or -1 at code positions; sequence_id (B, L)
        int64: packed samples attend within their own id only (-1 at padding), rotary
        positions restart at each sample; None: one sample per row."""
        B, L = special.shape
        x = self.embed(z_q, special)
        positions = _positions(sequence_id, B, L, x.device)
        ctx = _Context(positions, bk.attention_mask(sequence_id), sequence_id)
        with bk.fp8_autocast(self.backends):
            for layer in self.layers:
                x = layer(x, ctx)
        x = self.norm(x)
        rot, trans, backbone = self.backbone(x)
        dist, direction, pae = self.pairwise(x).split(
            [DISTOGRAM_BINS, DIRECTION_PAIRS * DIRECTION_BINS, PAE_BINS], dim=-1
        )
        out = DecoderOutput(
            backbone=backbone,
            frames=(rot, trans),
            distogram_logits=dist,
            direction_logits=direction.unflatten(-1, (DIRECTION_PAIRS, DIRECTION_BINS)),
            pae_logits=pae,
            embeddings=x,
        )
        if self.sequence is not None:
            out.sequence_logits = self.sequence(x)
        if self.atoms is not None and self.plddt is not None:
            out.atoms = self._all_atoms(x, rot, trans, backbone)
            out.plddt_logits = self.plddt(x)
        return out

    def _all_atoms(
        self, x: torch.Tensor, rot: torch.Tensor, trans: torch.Tensor, backbone: torch.Tensor
    ) -> torch.Tensor:
        """atom37: N/CA/C from the backbone head, the rest predicted in the residue frame."""
        local = self.atoms(x).float().unflatten(-1, (N_ATOM37, 3))
        atoms = place(rot, trans, local)
        return torch.cat([backbone, atoms[..., 3:, :]], dim=-2)


def decoder_param_count(
    cfg: DecoderConfig, d_code: int = 128, n_codes: int = 4096, vocab_size: int = 64
) -> int:
    """Parameters of a StructureDecoder, counted on the meta device (nothing allocated)."""
    with torch.device("meta"):
        model = StructureDecoder(cfg, d_code, n_codes, vocab_size, device="cpu")
    return sum(p.numel() for p in model.parameters())
