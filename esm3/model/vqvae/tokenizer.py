"""A trained VQ-VAE encoder as the preprocessing's structure tokenizer.

It implements `esm3.tokenize.structure.StructureTokenizer`, so the `tokens` stage writes
its codes into the shards exactly where the k-means tokenizer's went. Its file is a plain
torch file (the encoder's config and weights, no optimizer, no decoder), written from a
training checkpoint by `export` and read back by `load`; `identity` says which tokenizer
made a store (kind, codebook size and a digest of the weights), so training can refuse to
mix stores tokenized by different tokenizers.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from esm3.model.vqvae.config import EncoderConfig
from esm3.model.vqvae.encoder import StructureEncoder

FILE_KIND = "esm3-structure-encoder"
FORMAT_VERSION = 1
NO_TOKEN = -1  # the k-means tokenizer's "no complete backbone" code


class VQVAEStructureTokenizer:
    """Backbone (L, 3, 3) -> codebook indices with a trained VQ-VAE encoder (on CPU)."""

    def __init__(self, encoder: StructureEncoder, source: str = "") -> None:
        self.encoder = encoder.eval()
        self.source = source  # the checkpoint it was exported from

    @property
    def codebook_size(self) -> int:
        return self.encoder.cfg.n_codes

    def fit(self, backbones: Iterable[np.ndarray]) -> VQVAEStructureTokenizer:
        raise NotImplementedError(
            "a VQ-VAE tokenizer is trained as a model: `esm3 train --config vqvae_stage1`"
        )

    def encode(self, backbone: np.ndarray) -> np.ndarray:
        """(L, 3, 3) N/CA/C Angstrom -> (L,) int16 codes, NO_TOKEN where a residue has no
        complete backbone (as the k-means tokenizer)."""
        coords = torch.as_tensor(np.asarray(backbone, dtype=np.float32))
        tokens = self.encoder.tokenize(coords).numpy()
        return np.where(tokens >= self.codebook_size, NO_TOKEN, tokens).astype(np.int16)

    def save(self, path: str | Path) -> None:
        state = {k: v.detach().cpu() for k, v in self.encoder.state_dict().items()}
        torch.save(
            {"kind": FILE_KIND, "version": FORMAT_VERSION, "source": self.source,
             "config": asdict(self.encoder.cfg), "state_dict": state},
            Path(path),
        )  # fmt: skip

    @classmethod
    def load(cls, path: str | Path) -> VQVAEStructureTokenizer:
        data = torch.load(Path(path), map_location="cpu", weights_only=True)
        if not isinstance(data, dict) or data.get("kind") != FILE_KIND:
            raise ValueError(f"{path}: not a structure encoder file ({FILE_KIND})")
        if data.get("version") != FORMAT_VERSION:
            raise ValueError(f"{path}: format version {data.get('version')}, expected "
                             f"{FORMAT_VERSION}")  # fmt: skip
        encoder = StructureEncoder(EncoderConfig(**data["config"]))
        encoder.load_state_dict(data["state_dict"], strict=True)
        return cls(encoder, data.get("source", ""))


def identity(path: str | Path) -> dict[str, Any]:
    """Which structure tokenizer a file holds: kind (kmeans | vqvae), codebook size and a
    digest of the file's bytes."""
    path = Path(path)
    digest = hashlib.blake2b(path.read_bytes(), digest_size=8).hexdigest()
    if path.suffix == ".npz":
        from esm3.tokenize.structure import KMeansStructureTokenizer

        return {"kind": "kmeans", "codebook_size": KMeansStructureTokenizer.load(path).codebook_size,
                "digest": digest}  # fmt: skip
    tok = VQVAEStructureTokenizer.load(path)
    return {"kind": "vqvae", "codebook_size": tok.codebook_size, "digest": digest,
            "source": tok.source}  # fmt: skip


def load_structure_tokenizer(path: str | Path) -> Any:
    """The tokenizer of a file: the k-means codebook (.npz) or a VQ-VAE encoder (.pt)."""
    if Path(path).suffix == ".npz":
        from esm3.tokenize.structure import KMeansStructureTokenizer

        return KMeansStructureTokenizer.load(path)
    return VQVAEStructureTokenizer.load(path)
