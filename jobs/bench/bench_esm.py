"""The suite's model against EvolutionaryScale's `esm` ESM3 at the same shape, on CPU in fp32.

Rows: the machine's own fp32 matmul rate (GFLOP/s of a square torch matmul, the best
sample of the run), then per shape the forward+backward tokens/s of both models on the same
batch (timed interleaved, medians), the ratio suite / esm, GFLOP/s of each from the suite's
`flops_per_token`, the fraction of the matmul rate each reaches, and the parameter count of
each. Both models get only the sequence and backbone coordinates, so geometric attention
runs in both. Needs the `esm` package (a test dependency that `make setup` installs);
without it the suite is skipped.
"""

from __future__ import annotations

import statistics
import sys
import time
import types
from dataclasses import dataclass

import numpy as np
import torch

from esm3.model.config import ModelConfig, flops_per_token
from esm3.model.esm3 import ESM3
from esm3.tokenize.sequence import AMINO_ACIDS, encode_sequence
from esm3.tokenize.specials import SEQUENCE_BOS, SEQUENCE_EOS
from jobs.bench import bench_row

SUITE = "esm"


@dataclass(frozen=True)
class Shape:
    """One model shape: d_model, layers, self-attention heads and geometric heads."""

    d_model: int
    n_layers: int
    n_heads: int
    geom_heads: int

    @property
    def name(self) -> str:
        return f"d{self.d_model}_l{self.n_layers}_g{self.geom_heads}"


# the suite's default geometric head count (d_model // 64) at two sizes,
# and 256 geometric heads (esm's open 1.4B model's count) at the small shape
SHAPES = (Shape(384, 6, 6, 6), Shape(768, 12, 12, 12), Shape(384, 6, 6, 256))


def _row(name, metric, value, unit, baseline=None, params=None):
    return bench_row(SUITE, name, metric, value, unit, baseline=baseline, params=params)


class MatmulRate:
    """The machine's fp32 matmul rate: GFLOP/s of an n x n x n torch matmul, the best of
    every sample taken (a few up front, then one between the models' timed steps, so that
    a quiet moment anywhere in the run is found even when other work loads the machine)."""

    def __init__(self, n: int = 2048, tries: int = 3) -> None:
        g = torch.Generator().manual_seed(0)
        self.n = n
        self.a, self.b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
        self.samples = 0
        self.best_s = float("inf")
        self.a @ self.b  # warm-up
        for _ in range(tries):
            self.sample()

    def sample(self) -> None:
        t = time.perf_counter()
        self.a @ self.b
        self.best_s = min(self.best_s, time.perf_counter() - t)
        self.samples += 1

    @property
    def gflops(self) -> float:
        return 2.0 * self.n**3 / self.best_s / 1e9


def esm_model(shape: Shape) -> torch.nn.Module:
    """esm's ESM3 at `shape` (esm's own initialisation; no structure or function decoders)."""
    from esm.models.esm3 import ESM3 as EsmESM3

    # the tokenizers are read for the mask id of a missing sequence only (the sequence is given)
    tokenizers = types.SimpleNamespace(sequence=types.SimpleNamespace(mask_token_id=32))
    return EsmESM3(
        d_model=shape.d_model,
        n_heads=shape.n_heads,
        v_heads=shape.geom_heads,
        n_layers=shape.n_layers,
        structure_encoder_fn=lambda _: None,
        structure_decoder_fn=lambda _: None,
        function_decoder_fn=lambda _: None,
        tokenizers=tokenizers,
    )


def _suite_config(shape: Shape) -> ModelConfig:
    return ModelConfig(
        name=shape.name,
        d_model=shape.d_model,
        n_layers=shape.n_layers,
        d_head=shape.d_model // shape.n_heads,
        ffn_ratio=8 / 3,
        ffn_multiple=256,
        geom_heads=shape.geom_heads,
        track_max_logit=False,
    )


def _batch(B: int, L: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence tokens (the same ids in both models) and coords (B, L+2, 3, 3).

    Residues drawn from the 20 standard amino acids; backbones a random walk with 3.8 A CA
    steps; bos/eos at the ends (no coordinates there, as in real data)."""
    rng = np.random.default_rng(seed)
    tokens, coords = [], []
    for _ in range(B):
        seq = "".join(rng.choice(list(AMINO_ACIDS), L))
        tokens.append([SEQUENCE_BOS, *encode_sequence(seq).tolist(), SEQUENCE_EOS])
        step = rng.normal(size=(L, 3))
        ca = np.cumsum(3.8 * step / np.linalg.norm(step, axis=1, keepdims=True), axis=0)
        n = ca + rng.normal(0, 0.8, (L, 3))
        c = ca + rng.normal(0, 0.8, (L, 3))
        xyz = np.full((L + 2, 3, 3), np.nan)
        xyz[1:-1] = np.stack([n, ca, c], axis=1)
        coords.append(xyz)
    return torch.tensor(tokens), torch.tensor(np.stack(coords), dtype=torch.float32)


def _loss(out: object) -> torch.Tensor:
    """Sum of the means of every track's logits (a dict `.logits`, or `*_logits` fields)."""
    logits = getattr(out, "logits", None)
    if isinstance(logits, dict):
        tensors = list(logits.values())
    else:
        tensors = [v for k, v in vars(out).items() if k.endswith("logits") and torch.is_tensor(v)]
    return sum(t.float().mean() for t in tensors)


def _parts(model: torch.nn.Module) -> dict[str, int]:
    """Parameters of the embeddings, the trunk and the output heads, and in all."""
    parts = {"embeddings": 0, "trunk": 0, "heads": 0}
    for name, p in model.named_parameters():
        top = name.split(".", 1)[0]
        part = (
            "embeddings"
            if top in ("embed", "encoder")
            else "heads"
            if top in ("heads", "output_heads")
            else "trunk"
        )
        parts[part] += p.numel()
    return parts | {"total": sum(parts.values())}


def _measure_shape(shape: Shape, B: int, L: int, reps: int, matmul: MatmulRate) -> dict:
    """Both models' tokens/s (medians of interleaved steps) and parameter counts."""
    cfg = _suite_config(shape)
    esm_hidden = int((8 / 3 * shape.d_model + 255) // 256 * 256)
    if cfg.ffn_hidden != esm_hidden:
        raise ValueError(f"FFN hidden sizes differ: suite {cfg.ffn_hidden}, esm {esm_hidden}")
    torch.manual_seed(0)
    suite = ESM3(cfg)
    torch.manual_seed(0)
    esm = esm_model(shape)
    tokens, coords = _batch(B, L)
    T = tokens.shape[1]

    def suite_step() -> None:
        _loss(suite(sequence=tokens, coords=coords)).backward()

    def esm_step() -> None:
        _loss(esm(sequence_tokens=tokens, structure_coords=coords)).backward()

    steps = {"suite": (suite, suite_step), "esm": (esm, esm_step)}
    times: dict[str, list[float]] = {"suite": [], "esm": []}
    for rep in range(reps + 1):  # rep 0 is the warm-up; alternate which model goes first
        for who in ("suite", "esm") if rep % 2 == 0 else ("esm", "suite"):
            model, step = steps[who]
            model.zero_grad(set_to_none=True)
            t = time.perf_counter()
            step()
            if rep:
                times[who].append(time.perf_counter() - t)
        matmul.sample()
    counts = {who: _parts(model) for who, (model, _) in steps.items()}

    diff = {k: counts["suite"][k] - counts["esm"][k] for k in counts["suite"]}
    print(
        f"  {shape.name}: parameters suite {counts['suite']['total']:,}, esm "
        f"{counts['esm']['total']:,}, difference {diff['total']:+,} (embeddings "
        f"{diff['embeddings']:+,}, trunk {diff['trunk']:+,}, heads {diff['heads']:+,})",
        flush=True,
    )
    return {
        "shape": shape,
        "cfg": cfg,
        "batch": B,
        "length": T,
        "reps": reps,
        "tokens_per_s": {who: B * T / statistics.median(ts) for who, ts in times.items()},
        "counts": counts,
        "difference": diff,
    }


def _shape_rows(m: dict, matmul: float) -> list[dict]:
    shape, cfg, tps, counts = m["shape"], m["cfg"], m["tokens_per_s"], m["counts"]
    flops = flops_per_token(cfg, m["length"])
    params = {
        "d_model": shape.d_model,
        "n_layers": shape.n_layers,
        "n_heads": shape.n_heads,
        "geom_heads": shape.geom_heads,
        "ffn_hidden": cfg.ffn_hidden,
        "batch": m["batch"],
        "length": m["length"],
        "reps": m["reps"],
        "threads": torch.get_num_threads(),
        "dtype": "float32",
        "flops_per_token": flops,
        "matmul_gflops_per_s": matmul,
        "params_suite": counts["suite"],
        "params_esm": counts["esm"],
        "params_difference": m["difference"],
    }
    gflops = {who: v * flops / 1e9 for who, v in tps.items()}
    # the suite's rows carry esm's figure as their baseline (ratio = suite / esm)
    esm_figures = {"tokens": tps["esm"], "gflops": gflops["esm"], "params": counts["esm"]["total"]}
    rows = []
    for who, base in (("esm", {}), ("suite", esm_figures)):
        name = f"{shape.name}/{who}"
        rows += [
            _row(name, "tokens_per_s", tps[who], "tokens/s", base.get("tokens"), params),
            _row(name, "gflops_per_s", gflops[who], "GFLOP/s", base.get("gflops"), params),
            _row(name, "matmul_fraction", gflops[who] / matmul, "fraction", params=params),
            _row(name, "params", counts[who]["total"], "params", base.get("params"), params),
        ]
    return rows


def measure(
    shapes: tuple[Shape, ...] = SHAPES,
    *,
    batch: int = 2,
    length: int = 256,
    reps: int = 5,
    matmul_n: int = 2048,
) -> list[dict]:
    """Benchmark rows: the matmul rate (best sample of the run), then per shape both models.

    `length` residues per protein (bos/eos added); `reps` timed forward+backward steps of
    each model after one warm-up step each."""
    matmul = MatmulRate(matmul_n)
    measured = [_measure_shape(shape, batch, length, reps, matmul) for shape in shapes]
    rate = matmul.gflops
    rows = [
        _row(
            f"matmul/fp32_{matmul_n}",
            "gflops_per_s",
            rate,
            "GFLOP/s",
            params={
                "n": matmul_n,
                "samples": matmul.samples,
                "threads": torch.get_num_threads(),
                "dtype": "float32",
            },
        )
    ]
    for m in measured:
        rows += _shape_rows(m, rate)
    return rows


def run(quick: bool = False) -> list[dict]:
    """Benchmark rows; quick=True times fewer steps (about a minute on 2 cores)."""
    try:
        import esm.models.esm3  # noqa: F401
    except ImportError as e:
        print(f"  skipped: the esm package is not importable ({e}); pip install esm", flush=True)
        return []
    return measure(reps=5 if quick else 11)


if __name__ == "__main__":
    for r in run(quick="--quick" in sys.argv):
        print(
            f"{r['name']:28s} {r['metric']:16s} {r['value']:14,.3f} {r['unit']:9s} "
            f"ratio={r['ratio']}"
        )
