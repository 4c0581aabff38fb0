"""Model and task-pipeline speed on CPU.

Rows: forward+backward tokens/s of the tiny and ~100M configs with a per-layer breakdown,
and the corruption recipe's samples/s on one core at length 512, against a naive
per-residue Python baseline run side by side.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from esm3.model.config import flops_per_token, param_count, preset
from esm3.model.esm3 import ESM3, _Context
from esm3.model.geometry import backbone_frames, geometric_bias
from esm3.tasks.config import TaskConfig
from esm3.tasks.corrupt import corrupt
from esm3.tasks.sample import Protein
from esm3.tasks.schedules import sample_mask_rate
from esm3.tokenize.sequence import LETTERS
from jobs.bench import bench_row

SUITE = "model"


def _row(name, metric, value, unit, baseline=None, params=None):
    return bench_row(SUITE, name, metric, value, unit, baseline=baseline, params=params)


def _timeit(fn, reps: int) -> float:
    fn()  # warm-up
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def _model_rows(name: str, B: int, T: int, reps: int) -> list[dict]:
    torch.manual_seed(0)
    cfg = preset(name, track_max_logit=False)
    model = ESM3(cfg)
    seq = torch.randint(5, 30, (B, T))
    co = torch.randn(B, T, 3, 3) * 10
    params = {
        "config": name,
        "batch": B,
        "length": T,
        "params": param_count(cfg),
        "threads": torch.get_num_threads(),
    }

    def step():
        out = model(seq, coords=co)
        sum(v.float().mean() for v in out.logits.values()).backward()

    dt = _timeit(step, reps)
    rows = [
        _row(f"{name}/fwd_bwd", "tokens_per_s", B * T / dt, "tokens/s", params=params),
        _row(
            f"{name}/fwd_bwd",
            "gflops_per_s",
            B * T * flops_per_token(cfg, T) / dt / 1e9,
            "GFLOP/s",
            params=params,
        ),
    ]
    # per layer: each block's forward + backward on its own
    rot, trans, present = backbone_frames(co)
    bias = geometric_bias(present, torch.zeros(B, T, dtype=torch.long), None)
    ctx = _Context(torch.arange(T).expand(B, T), None, None, rot, trans, present, bias)
    x0 = torch.randn(B, T, cfg.d_model)
    for i, layer in enumerate(model.layers):
        if i >= 3 and layer.kind == "standard":
            continue  # standard blocks are alike: report the first two

        def block(layer=layer):
            x = x0.clone().requires_grad_(True)
            layer(x, ctx).sum().backward()

        bt = _timeit(block, reps)
        rows.append(
            _row(f"{name}/layer{i}_{layer.kind}", "fwd_bwd_ms", bt * 1e3, "ms", params=params)
        )
    return rows


def _protein(L: int, rng: np.random.Generator) -> Protein:
    # a compact random chain: CA on a self-avoiding-ish walk folded into a ball
    ca = np.cumsum(rng.normal(0, 2.2, (L, 3)), axis=0).astype(np.float32)
    coords = np.stack([ca - 1.2, ca, ca + 1.3], axis=1).astype(np.float32)
    return Protein(
        sequence="".join(rng.choice(list(LETTERS[:20]), L)),
        coords=coords,
        sasa=(rng.random(L) * 120).astype(np.float32),
        ss8="".join(rng.choice(list("GHITEBSC"), L)),
        structure_tokens=rng.integers(0, 4096, L),
        function=[("IPR000001", 1, L // 2), ("IPR000002", L // 3, L)],
        id="bench",
    )


def _naive_corrupt(p: Protein, rng: np.random.Generator) -> dict:
    """Baseline: the same per-track masking and noise, one residue at a time in Python."""
    idx = {c: i + 5 for i, c in enumerate(LETTERS)}
    out = {}
    tracks = {
        "sequence": [idx[c] for c in p.sequence],
        "structure": [int(t) + 5 for t in p.structure_tokens],
        "ss8": ["GHITEBSC".index(c) + 5 for c in p.ss8],
        "sasa": [
            int(
                np.searchsorted(
                    [
                        0.8,
                        4,
                        9.6,
                        16.4,
                        24.5,
                        32.9,
                        42,
                        51.5,
                        61.2,
                        70.9,
                        81.6,
                        93.3,
                        107.2,
                        125.4,
                        151.4,
                    ],
                    v,
                    side="right",
                )
            )
            + 6
            for v in p.sasa
        ],
    }
    for name, toks in tracks.items():
        rate = sample_mask_rate("cosine", rng)
        inp, loss = [], []
        for t in [2, *toks, 3]:
            m = t > 4 and rng.random() < rate
            inp.append(1 if m else t)
            loss.append(m)
        out[name] = (inp, loss)
    coords = []
    for r in range(len(p)):
        xyz = [[float(v) + rng.normal(0, 0.1) for v in atom] for atom in p.coords[r]]
        coords.append(xyz if rng.random() > 0.5 else None)
    out["coords"] = coords
    return out


def _task_rows(L: int, n: int) -> list[dict]:
    rng = np.random.default_rng(0)
    cfg = TaskConfig(residue_labels=("site",))
    prots = [_protein(L, rng) for _ in range(8)]
    t = time.perf_counter()
    for i in range(n):
        corrupt(prots[i % 8], rng, cfg)
    fast = n / (time.perf_counter() - t)
    nb = max(5, n // 50)
    t = time.perf_counter()
    for i in range(nb):
        _naive_corrupt(prots[i % 8], rng)
    naive = nb / (time.perf_counter() - t)
    params = {"length": L, "samples": n, "target_per_core": 2000}
    return [_row(f"corrupt/L{L}", "samples_per_s_per_core", fast, "samples/s", naive, params)]


def run(quick: bool = False) -> list[dict]:
    """Benchmark rows; quick=True runs the tiny model and a short task loop only."""
    threads = torch.get_num_threads()
    try:
        rows = _task_rows(512, 100 if quick else 4000)
        rows += _model_rows("tiny", 1, 64, 1) if quick else _model_rows("tiny", 8, 256, 5)
        if not quick:
            rows += _model_rows("bench_100m", 2, 256, 2)
    finally:
        torch.set_num_threads(threads)
    return rows


if __name__ == "__main__":
    for r in run(quick=False):
        print(
            f"{r['name']:32s} {r['metric']:24s} {r['value']:12.1f} {r['unit']}  ratio={r['ratio']}"
        )
