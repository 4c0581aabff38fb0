"""The structure tokenizer's VQ-VAE as one module: encoder, codebook and decoder (A.1.7).

`forward` is what training calls on a collated batch: every residue's neighbourhood is
encoded and quantised (straight-through), positions that are not residues take the
structure track's special tokens (BOS, EOS, PAD, chainbreak; MASK for a residue without a
backbone frame), and the decoder rebuilds the structure from that token sequence.
`tokenize` (one chain's backbone -> tokens) and `decode` (tokens -> backbone) are the
two directions a trained model is used in. Stage 2 freezes encoder and codebook: they stay
in eval mode (no EMA update) and get no gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from esm3.model.vqvae.config import VQVAEConfig
from esm3.model.vqvae.decoder import DecoderOutput, StructureDecoder
from esm3.model.vqvae.encoder import StructureEncoder
from esm3.tokenize.specials import SEQUENCE_SPECIALS, structure_specials

SEQUENCE_VOCAB = 64  # esm's sequence track: the inverse-folding head's outputs


@dataclass
class VQVAEOutput:
    decoded: DecoderOutput
    codes: torch.Tensor  # (B, T) int64 codebook index (meaningful where `coded`)
    coded: torch.Tensor  # (B, T) bool: a residue with a backbone frame (its code is used)
    tokens: torch.Tensor  # (B, T) int64 the structure track: codes and specials
    commitment: torch.Tensor  # scalar
    codebook_stats: dict[str, float]


def structure_special_ids(
    sequence: torch.Tensor, coded: torch.Tensor, n_codes: int
) -> torch.Tensor:
    """(B, T) special token id of each position that is not a code, -1 where it is.

    The sequence track says what a position is (BOS, EOS, PAD, chainbreak, else a residue);
    a residue without a backbone frame is MASK."""
    sp, seq = structure_specials(n_codes), SEQUENCE_SPECIALS
    out = torch.full_like(sequence, sp.mask)
    for seq_id, struct_id in (
        (seq.bos, sp.bos),
        (seq.eos, sp.eos),
        (seq.pad, sp.pad),
        (seq.chainbreak, sp.chainbreak),
    ):
        out = torch.where(sequence == seq_id, torch.full_like(out, struct_id), out)
    return torch.where(coded, torch.full_like(out, -1), out)


class VQVAE(nn.Module):
    """Encoder + EMA codebook + decoder of one training stage (`VQVAEConfig`)."""

    def __init__(self, cfg: VQVAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        enc = cfg.encoder
        self.encoder = StructureEncoder(enc)
        self.decoder = StructureDecoder(cfg.decoder, enc.d_code, enc.n_codes, SEQUENCE_VOCAB)
        if cfg.stage == 2:
            self.encoder.requires_grad_(False)

    @property
    def layers(self) -> nn.ModuleList:
        """The decoder's blocks: what FSDP and activation checkpointing wrap one by one."""
        return self.decoder.layers

    def train(self, mode: bool = True) -> VQVAE:
        super().train(mode)
        if self.cfg.stage == 2:
            self.encoder.eval()  # frozen: no EMA updates or restarts of the codebook
        return self

    def forward(
        self,
        sequence: torch.Tensor,
        coords: torch.Tensor,
        sequence_id: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        **_: Any,
    ) -> VQVAEOutput:
        """sequence (B, T) the batch's sequence input (only its specials are read); coords
        (B, T, 3, 3) N/CA/C Angstrom, NaN where missing; sequence_id (B, T) packed sample
        (-1 padding); positions (B, T) residue position within its sample."""
        residue = sequence == SEQUENCE_SPECIALS.mask
        z, present = self.encoder.embed(
            coords, mask=residue, sequence_id=sequence_id, residue_index=positions
        )
        coded = present & residue
        z_q, codes, commitment = self.encoder.codebook(z, coded)
        special = structure_special_ids(sequence, coded, self.cfg.encoder.n_codes)
        decoded = self.decoder(z_q, special, sequence_id)
        tokens = torch.where(coded, codes, special)
        return VQVAEOutput(decoded, codes, coded, tokens, commitment, self._codebook_stats())

    def _codebook_stats(self) -> dict[str, float]:
        s = self.encoder.codebook.last_stats
        if s is None or not self.encoder.codebook.training:
            return {}
        return {"codes_used": float(s.codes_used), "perplexity": float(s.perplexity),
                "codes_restarted": float(s.restarted)}  # fmt: skip

    @torch.no_grad()
    def tokenize(self, coords: torch.Tensor) -> torch.Tensor:
        """One chain's backbone (L, 3, 3) -> (L,) int64 tokens (MASK where no frame)."""
        return self.encoder.tokenize(coords)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, sequence_id: torch.Tensor | None = None) -> torch.Tensor:
        """Structure tokens (L,) or (B, L) (codes and specials) -> backbone (..., L, 3, 3).
        Without `sequence_id`, a row is one protein and its PAD positions are padding."""
        single = tokens.ndim == 1
        t = tokens[None] if single else tokens
        n = self.cfg.encoder.n_codes
        if sequence_id is None:
            pad = structure_specials(n).pad
            sequence_id = torch.where(t == pad, torch.full_like(t, -1), torch.zeros_like(t))
        is_code = t < n
        z_q = self.encoder.codebook.embeddings[t.clamp(max=n - 1)]
        special = torch.where(is_code, torch.full_like(t, -1), t)
        bb = self.decoder(z_q, special, sequence_id).backbone
        return bb[0] if single else bb


def vqvae_param_count(cfg: VQVAEConfig) -> int:
    """Parameters of the VQ-VAE of `cfg` (built on the meta device: no memory)."""
    with torch.device("meta"):
        model = VQVAE(cfg)
    return sum(p.numel() for p in model.parameters())
