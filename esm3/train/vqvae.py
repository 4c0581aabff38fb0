"""Training the structure tokenizer with the suite's trainer (A.1.7.3).

The `Trainer` takes any model and loss; this module gives it the VQ-VAE's: the model
(stage 2 with the stage-1 checkpoint's encoder and codebook loaded and frozen), the sum of
the stage's weighted losses, and per step the codebook's usage, perplexity and restarted
codes (`LossOutput.metrics`). In eval mode the loss also measures the reconstruction:
backbone RMSD after superposition and CA lDDT of decode(encode(x)) against x, per
structure (what validation reports).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import torch

from esm3.model.vqvae import losses as L
from esm3.model.vqvae.config import DecoderConfig, EncoderConfig, VQVAEConfig
from esm3.model.vqvae.model import VQVAE, VQVAEOutput
from esm3.model.vqvae.quality import kabsch_rmsd, lddt_ca
from esm3.train import checkpoint as ckpt
from esm3.train.loss import LossOutput
from esm3.train.parallel import parallelize

#: the losses of each stage (their weights: VQVAEConfig.loss_weights)
STAGE_LOSSES = {
    1: ("distance", "direction", "distogram", "direction_bins", "inverse_folding", "commitment"),
    2: ("distance", "direction", "distogram", "direction_bins", "all_atom_distance",
        "all_atom_direction", "plddt", "pae"),
}  # fmt: skip
#: per-step codebook values (stage 1; stage 2's codebook is frozen)
CODEBOOK_METRICS = ("codes_used", "perplexity", "codes_restarted")
#: reconstruction quality, measured in eval mode (validation)
QUALITY = ("rmsd", "lddt")


def residue_mask(coords: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: residues with a complete N/CA/C backbone."""
    return torch.isfinite(coords).all(dim=-1).all(dim=-1)


class VQVAELoss:
    """The stage's weighted sum of losses on a collated batch (as `ESM3Loss`, for the trainer
    and the evaluator)."""

    def __init__(self, cfg: VQVAEConfig) -> None:
        self.cfg = cfg
        self.names = STAGE_LOSSES[cfg.stage]
        self.weights = {n: cfg.loss_weights.get(n, 1.0) for n in self.names}

    def __call__(self, out: VQVAEOutput, batch: Any) -> LossOutput:
        true = batch.inputs["coords"]
        seq_id = batch.inputs.get("sequence_id")
        mask = residue_mask(true) & out.coded
        terms = self._losses(out, batch, true, mask, seq_id)
        total = sum(self.weights[k] * t.value for k, t in terms.items())
        per_track = {k: t.value.detach().float() for k, t in terms.items()}
        counts = {k: int(t.count) for k, t in terms.items()}
        if not is_training_forward(out):
            per_track |= quality(out.decoded.backbone, true, mask, seq_id)
            counts |= dict.fromkeys(QUALITY, structures(mask, seq_id))
        return LossOutput(total, per_track, counts, codebook_metrics(out))

    def _losses(
        self, out: VQVAEOutput, batch: Any, true: torch.Tensor, mask: torch.Tensor, seq_id: Any
    ) -> dict[str, L.LossTerm]:
        d = out.decoded
        pred = d.backbone
        terms = {
            "distance": L.backbone_distance_loss(pred, true, mask, seq_id, self.cfg.distance_clamp),
            "direction": L.backbone_direction_loss(
                pred, true, mask, seq_id, self.cfg.direction_clamp
            ),
            "distogram": L.distogram_loss(d.distogram_logits, true, mask, seq_id),
            "direction_bins": L.direction_bins_loss(d.direction_logits, true, mask, seq_id),
        }
        if "inverse_folding" in self.names:
            targets, seq_mask = batch.targets["sequence"], batch.loss_masks["sequence"]
            terms["inverse_folding"] = L.inverse_folding_loss(d.sequence_logits, targets, seq_mask)
        if "commitment" in self.names:
            terms["commitment"] = L.LossTerm(out.commitment.float(), mask.sum().float())
        if self.cfg.stage == 2:
            terms |= self._all_atom_losses(d, batch, true, mask, seq_id)
        return terms

    def _all_atom_losses(
        self, d: Any, batch: Any, true: torch.Tensor, mask: torch.Tensor, seq_id: Any
    ) -> dict[str, L.LossTerm]:
        if "atoms" not in batch.inputs:
            raise ValueError("stage 2 trains on all-atom coordinates: the batch has none "
                             "(inputs 'atoms' (B, T, 37, 3) and 'atom_mask' (B, T, 37))")  # fmt: skip
        atoms = batch.inputs["atoms"]
        atom_mask = batch.inputs["atom_mask"] & mask[..., None]
        return {
            "all_atom_distance": L.all_atom_distance_loss(
                d.atoms, atoms, atom_mask, seq_id, self.cfg.distance_clamp
            ),
            "all_atom_direction": L.all_atom_direction_loss(
                d.atoms, atoms, atom_mask, seq_id, self.cfg.direction_clamp
            ),
            "plddt": L.plddt_loss(d.plddt_logits, d.backbone, true, mask, seq_id),
            "pae": L.pae_loss(d.pae_logits, d.backbone, true, mask, seq_id),
        }


def codebook_metrics(out: VQVAEOutput) -> dict[str, float]:
    """The step's codebook usage (stage 1: the codebook learns; stage 2: none)."""
    return {k: float(out.codebook_stats[k]) for k in CODEBOOK_METRICS if k in out.codebook_stats}


def is_training_forward(out: VQVAEOutput) -> bool:
    """Whether the output came from a training forward (gradients on)."""
    return torch.is_grad_enabled() and out.decoded.backbone.requires_grad


def _samples(seq_id: torch.Tensor | None, mask: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """(row, positions) of every packed sample with residues."""
    out = []
    for b in range(mask.shape[0]):
        ids = seq_id[b] if seq_id is not None else torch.zeros_like(mask[b], dtype=torch.long)
        for s in torch.unique(ids[mask[b]]).tolist():
            out.append((b, (ids == s) & mask[b]))
    return out


def structures(mask: torch.Tensor, seq_id: torch.Tensor | None) -> int:
    return len(_samples(seq_id, mask))


def per_structure_quality(
    pred: torch.Tensor, true: torch.Tensor, mask: torch.Tensor, seq_id: torch.Tensor | None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(backbone RMSD in Angstrom after superposition, CA lDDT) of each packed structure of
    a batch, over its residues in `mask`, in batch order."""
    out = []
    for b, sel in _samples(seq_id, mask):
        p, t = pred[b][sel].float(), true[b][sel].float()
        ok = torch.ones(p.shape[0], dtype=torch.bool, device=p.device)
        out.append((kabsch_rmsd(p, t, ok), lddt_ca(p, t, ok)))
    return out


def quality(
    pred: torch.Tensor, true: torch.Tensor, mask: torch.Tensor, seq_id: torch.Tensor | None
) -> dict[str, torch.Tensor]:
    """Mean over the batch's structures of backbone RMSD and CA lDDT of the prediction."""
    each = per_structure_quality(pred, true, mask, seq_id)
    if not each:
        return {}
    rmsd, lddt = zip(*each, strict=True)
    return {"rmsd": torch.stack(rmsd).mean(), "lddt": torch.stack(lddt).mean()}


def config_of(state: dict[str, Any], name: str = "from-checkpoint") -> VQVAEConfig:
    """The VQ-VAE a checkpoint's fingerprint describes; CheckpointMismatch for another model."""
    fp = state.get("model") or {}
    if fp.get("kind") != "vqvae":
        raise ckpt.CheckpointMismatch("not a structure tokenizer (VQ-VAE) checkpoint")
    return VQVAEConfig(
        name=name, stage=fp["stage"], encoder=EncoderConfig(**fp["encoder"]),
        decoder=DecoderConfig(**fp["decoder"]),
    )  # fmt: skip


def stage1_config(state: dict[str, Any]) -> VQVAEConfig:
    """The stage-1 VQ-VAE a checkpoint's fingerprint describes."""
    cfg = config_of(state, "stage1")
    if cfg.stage != 1:
        raise ckpt.CheckpointMismatch(f"a stage-{cfg.stage} checkpoint, not stage 1")
    return cfg


def load_vqvae(path: str | Path, device: str | torch.device = "cpu") -> VQVAE:
    """A trained VQ-VAE from a checkpoint (a step folder or a run's folder: its newest), in
    eval mode. Raises FileNotFoundError or CheckpointMismatch naming the path."""
    folder = ckpt.resolve(path)
    try:
        cfg = config_of(ckpt.read_state(folder), folder.name)
    except ckpt.CheckpointMismatch as e:
        raise ckpt.CheckpointMismatch(f"{folder}: {e}") from e
    model = VQVAE(cfg)
    ckpt.load(folder, model, None)
    return model.to(device).eval()


def check_stage1(state: dict[str, Any], cfg: VQVAEConfig) -> None:
    """A stage-1 checkpoint's state whose encoder has `cfg`'s shape; CheckpointMismatch
    saying which it is not (at submission and again when stage 2 loads it)."""
    trained = stage1_config(state).fingerprint()["encoder"]
    want = cfg.fingerprint()["encoder"]
    if trained != want:
        raise ckpt.CheckpointMismatch(f"its encoder {trained} is not the config's {want}")


def load_frozen_encoder(model: VQVAE, stage1: str | Path) -> None:
    """Stage 2: the stage-1 checkpoint's encoder and codebook, into `model` (frozen)."""
    folder = ckpt.resolve(stage1)
    try:
        check_stage1(ckpt.read_state(folder), model.cfg)
    except ckpt.CheckpointMismatch as e:
        raise ckpt.CheckpointMismatch(f"{folder}: {e}") from e
    model.encoder.load_state_dict(load_vqvae(folder).encoder.state_dict(), strict=True)


def flops_per_token(cfg: VQVAEConfig, seq_len: int) -> float:
    """Training FLOPs per residue (6 x parameters touched: each encoder parameter once per
    neighbour, each decoder parameter once; attention over the sequence in the decoder)."""
    with torch.device("meta"):
        model = VQVAE(cfg)
    enc = sum(p.numel() for p in model.encoder.parameters())
    dec = sum(p.numel() for p in model.decoder.parameters())
    attn = 2 * cfg.decoder.n_layers * cfg.decoder.d_model * seq_len
    return 6.0 * (enc * cfg.encoder.knn + dec) + 6.0 * attn


def vqvae_train_model(cfg: Any, device: torch.device, *, distributed: bool) -> Any:
    """The config's VQ-VAE as the trainer needs it (FSDP2 over the decoder's blocks)."""
    from esm3.train.trainer import TrainModel

    vcfg: VQVAEConfig = cfg.model_config()
    torch.manual_seed(cfg.seed)  # same initial weights on every rank and attempt
    model = VQVAE(vcfg)
    if vcfg.stage == 2:
        load_frozen_encoder(model, cfg.model.stage1_checkpoint)
    n_params = sum(p.numel() for p in model.parameters())
    module, precision = parallelize(model.to(device), cfg.parallel, device, distributed=distributed)
    return TrainModel(
        module,
        n_params,
        ckpt.fingerprint(vcfg),
        partial(flops_per_token, vcfg),
        precision,
        STAGE_LOSSES[vcfg.stage],
        CODEBOOK_METRICS if vcfg.stage == 1 else (),
    )
