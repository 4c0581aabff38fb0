"""The structure tokenizer (VQ-VAE) on real chains of MDAnalysisTests, CPU fp32.

Rows:
- encoding throughput, residues/s on one core (torch threads 1), of the VQ-VAE encoder at
  the released shape (d 1024, 2 geometric blocks of 128 heads, 4,096 x 128 codes; the
  weights do not change the cost) and at the tiny preset, each against the k-means
  tokenizer (4,096 codes) on the same chains (ratio = VQ-VAE / k-means);
- reconstruction of a small VQ-VAE overfit on two real chains (`overfit`, what the test
  runs): backbone RMSD and CA lDDT of decode(encode(x)) against x, steps and seconds taken,
  codes used and perplexity of its 64-code book.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from jobs.bench import bench_row

SUITE = "vqvae"
_CHAINS = ("mmcif/5PTI.cif.gz", "adk_open.pdb", "mmcif/1BD2.cif.gz")


def _row(name, metric, value, unit, baseline=None, params=None):
    return bench_row(SUITE, name, metric, value, unit, baseline=baseline, params=params)


def real_backbones(quick: bool) -> list[np.ndarray]:
    """Backbones (L, 3, 3) of real chains (MDAnalysisTests); [] when it is not installed."""
    from esm3.data.structures.io import read_structure
    from jobs.bench.bench_structures import _data_dir

    root = _data_dir()
    if root is None:
        return []
    names = _CHAINS[:1] if quick else _CHAINS
    return [c.backbone for n in names if (root / n).exists()
            for c in read_structure(root / n).chains]  # fmt: skip


# --- the overfit -------------------------------------------------------------------------


@dataclass
class Overfit:
    model: torch.nn.Module
    batch: object  # inputs, targets, loss_masks of the chains as the loader batches them
    rmsd: list[float]  # per chain, Angstrom
    lddt: list[float]
    steps: int
    seconds: float


def reconstruction(model, batch) -> tuple[list[float], list[float]]:  # type: ignore[no-untyped-def]
    """Per chain: backbone RMSD (after superposition) and CA lDDT of the model's
    reconstruction from its tokens (eval mode; the model's mode is restored)."""
    from esm3.train.vqvae import per_structure_quality, residue_mask

    was = model.training
    model.eval()
    with torch.no_grad():
        pred = model(**batch.inputs).decoded.backbone
    model.train(was)
    true = batch.inputs["coords"]
    each = per_structure_quality(pred, true, residue_mask(true), batch.inputs["sequence_id"])
    return [float(r) for r, _ in each], [float(q) for _, q in each]


def overfit(
    proteins: list, *, max_steps: int = 1500, check_every: int = 50, seed: int = 0,
    target_rmsd: float = 2.0,
) -> Overfit:  # fmt: skip
    """Train the tiny VQ-VAE (decoder d 128, 4 blocks; 64 codes) on `proteins` (whole, one
    per row) until every chain's reconstruction is within `target_rmsd` (checked every
    `check_every` steps) or `max_steps`. The direction loss weighs 10: on a handful of
    chains the distances alone often settle on a mirror image of part of a chain, which only
    the direction loss tells apart (see tests/test_vqvae_overfit.py)."""
    from esm3.model.vqvae.config import vqvae_config
    from esm3.model.vqvae.model import VQVAE
    from esm3.tasks.batching import collate
    from esm3.tasks.config import TaskConfig
    from esm3.tasks.corrupt import structure_sample
    from esm3.train.validation import _EvalBatch
    from esm3.train.vqvae import VQVAELoss

    torch.manual_seed(seed)
    base = vqvae_config("vqvae_tiny")
    cfg = vqvae_config(
        "vqvae_tiny",
        decoder={"d_model": 128, "n_layers": 4, "n_heads": 4, "pair_dim": 32},
        loss_weights={**base.loss_weights, "direction": 10.0},
    )
    model = VQVAE(cfg)
    task = TaskConfig(max_length=max(len(p) for p in proteins) + 2)
    samples = [structure_sample(p, np.random.default_rng(0), task) for p in proteins]
    batch = _EvalBatch(*collate(samples, sizes=task.track_sizes()).to_torch())
    loss_fn = VQVAELoss(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    model.train()
    t0 = time.perf_counter()
    rmsd, lddt = [float("inf")], [0.0]
    step = 0
    while step < max_steps:
        step += 1
        loss_fn(model(**batch.inputs), batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % check_every == 0 or step == max_steps:
            rmsd, lddt = reconstruction(model, batch)
            if max(rmsd) < target_rmsd:
                break
    return Overfit(model, batch, rmsd, lddt, step, time.perf_counter() - t0)


def overfit_chains() -> list:
    """BPTI (58 residues, whole) and the first 60 residues of adenylate kinase."""
    from esm3.data.structures.io import read_structure
    from esm3.tasks.sample import Protein
    from jobs.bench.bench_structures import _data_dir

    root = _data_dir()
    if root is None:
        return []
    bpti = read_structure(root / "mmcif/5PTI.cif.gz").chains[0]
    adk = read_structure(root / "adk_open.pdb").chains[0]
    return [
        Protein(bpti.sequence, coords=bpti.backbone, id="5PTI"),
        Protein(adk.sequence[:60], coords=adk.backbone[:60], id="adk:1-60"),
    ]


# --- the rows ------------------------------------------------------------------------------


def _residues_per_s(encode, backbones: list[np.ndarray]) -> float:  # type: ignore[no-untyped-def]
    encode(backbones[0][:16])  # warm-up
    t0 = time.perf_counter()
    for b in backbones:
        encode(b)
    return sum(len(b) for b in backbones) / (time.perf_counter() - t0)


def _throughput_rows(backbones: list[np.ndarray], quick: bool) -> list[dict]:
    from esm3.model.vqvae.config import EncoderConfig, vqvae_config
    from esm3.model.vqvae.encoder import StructureEncoder
    from esm3.model.vqvae.tokenizer import VQVAEStructureTokenizer
    from esm3.tokenize.structure import KMeansStructureTokenizer
    from jobs.bench.bench_structures import _feature_dim

    kmeans = KMeansStructureTokenizer(4096)
    kmeans.centroids = np.random.default_rng(0).normal(size=(4096, _feature_dim()))
    residues = sum(len(b) for b in backbones)
    base = _residues_per_s(kmeans.encode, backbones)
    rows = [_row("kmeans_4096", "residues_per_s", base, "1/s",
                 params={"residues": residues, "threads": 1})]  # fmt: skip
    shapes = {"released": EncoderConfig(), "tiny": vqvae_config("vqvae_tiny").encoder}
    for name, enc in shapes.items():
        torch.manual_seed(0)
        tok = VQVAEStructureTokenizer(StructureEncoder(enc))
        sample = backbones[:1] if quick and name == "released" else backbones
        rate = _residues_per_s(tok.encode, sample)
        rows.append(_row(f"vqvae_{name}", "residues_per_s", rate, "1/s", baseline=base,
                         params={"residues": sum(len(b) for b in sample), "threads": 1,
                                 "d_model": enc.d_model, "n_layers": enc.n_layers,
                                 "geom_heads": enc.geom_heads, "n_codes": enc.n_codes}))  # fmt: skip
    return rows


def _overfit_rows() -> list[dict]:
    chains = overfit_chains()
    if not chains:
        return []
    got = overfit(chains)
    model, batch = got.model, got.batch
    model.eval()
    with torch.no_grad():
        out = model(**batch.inputs)
    counts = torch.bincount(out.codes[out.coded], minlength=64).double()
    p = counts[counts > 0] / counts.sum()
    params = {"chains": [c.id for c in chains], "residues": sum(len(c) for c in chains),
              "steps": got.steps, "threads": torch.get_num_threads()}  # fmt: skip
    return [
        _row("overfit/rmsd", "backbone_rmsd", max(got.rmsd), "A", params=params),
        _row("overfit/lddt", "lddt_ca", min(got.lddt), "", params=params),
        _row("overfit/steps", "steps", got.steps, "", params=params),
        _row("overfit/time", "seconds", got.seconds, "s", params=params),
        _row("overfit/codes_used", "codes", int((counts > 0).sum()), "of 64", params=params),
        _row(
            "overfit/perplexity",
            "perplexity",
            float(torch.exp(-(p * p.log()).sum())),
            "",
            params=params,
        ),  # fmt: skip
    ]


def run(quick: bool = False) -> list[dict]:
    backbones = real_backbones(quick)
    if not backbones:
        print("  skipped: MDAnalysisTests is not installed (make setup installs it)", flush=True)
        return []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = _throughput_rows(backbones, quick)
    finally:
        torch.set_num_threads(threads)
    return rows + ([] if quick else _overfit_rows())
