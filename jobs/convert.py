"""The `esm3 convert` subcommand: checkpoints across to EvolutionaryScale's `esm` and back.

`to-esm CHECKPOINT OUT.pt` writes the weights of a suite checkpoint (a `step_*` folder, or
a run's checkpoint folder: its newest complete one) as a state dict that
`esm.models.esm3.ESM3` loads with strict=True. `from-esm IN.pt OUT` writes an `esm` ESM3
state dict (e.g. a downloaded open model) as a suite checkpoint that training starts
from with `checkpoint.init_from = "OUT"` (weights only: fresh optimizer, step 0, an
`init` event), and prints the [model] settings that match it.

The structure tokenizer's encoder crosses too: `encoder-from-esm IN.pth OUT.pt` writes
esm's StructureTokenEncoder weights (e.g. the released esm3_structure_encoder_v0.pth) as the
suite's structure encoder file, which the tokens stage uses with `[codebook] vqvae =
"OUT.pt"`; `encoder-to-esm CHECKPOINT OUT.pth` writes the encoder of a structure tokenizer
trained by the suite (`esm3 train --config vqvae_stage1`) for esm's StructureTokenEncoder.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path
from typing import Any

from jobs.errors import UserError

EXAMPLES = """examples:
  esm3 convert to-esm workspace/checkpoints/<run>/step_00001000 esm3_mine.pt
  esm3 convert from-esm esm3_sm_open_v1.pth checkpoints/esm3-open
  esm3 train --config esm3_1.4b checkpoint.init_from=checkpoints/esm3-open
  esm3 convert encoder-from-esm esm3_structure_encoder_v0.pth structure-encoder.pt
  esm3 convert encoder-to-esm workspace/checkpoints/<vqvae run> structure_encoder.pth
"""


def add_parser(subparsers: argparse._SubParsersAction, common: Any) -> None:
    p = subparsers.add_parser(
        "convert",
        help="convert checkpoints to and from EvolutionaryScale's esm ESM3",
        description=(
            "Weights across to EvolutionaryScale's esm package and back: the suite's model "
            "has esm's architecture and token ids, so the tensors only change names."
        ),
        epilog=EXAMPLES + "\n" + common.epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="direction", metavar="DIRECTION", required=True)
    t = sub.add_parser("to-esm", help="a suite checkpoint -> an esm ESM3 state dict (.pt)")
    t.add_argument("checkpoint", help="a step_* checkpoint folder, or a folder of them (newest)")
    t.add_argument("out", help="the .pt file to write")
    t.set_defaults(fn=lambda a: _report(to_esm(Path(a.checkpoint), Path(a.out))))
    f = sub.add_parser("from-esm", help="an esm ESM3 state dict -> a suite checkpoint folder")
    f.add_argument("state_dict", help="a .pt/.pth file of esm's ESM3 (torch.save of a state dict)")
    f.add_argument("out", help="the checkpoint folder to write (for checkpoint.init_from)")
    f.add_argument(
        "--n-heads", type=int,
        help="attention heads (tensors do not show them; default d_model / 64, as every "
             "released ESM3)",
    )  # fmt: skip
    f.set_defaults(fn=lambda a: _report(from_esm(Path(a.state_dict), Path(a.out), a.n_heads)))
    e = sub.add_parser(
        "encoder-from-esm",
        help="esm's StructureTokenEncoder weights -> a structure encoder file for the tokens stage",
    )
    e.add_argument("state_dict", help="a .pt/.pth state dict of esm's StructureTokenEncoder")
    e.add_argument("out", help='the encoder file to write (for [codebook] vqvae = "OUT")')
    e.set_defaults(fn=lambda a: _report(encoder_from_esm(Path(a.state_dict), Path(a.out))))
    g = sub.add_parser(
        "encoder-to-esm",
        help="a structure tokenizer checkpoint's encoder -> esm's StructureTokenEncoder weights",
    )
    g.add_argument("checkpoint", help="a VQ-VAE step_* checkpoint folder, or a folder of them")
    g.add_argument("out", help="the .pth file to write")
    g.set_defaults(fn=lambda a: _report(encoder_to_esm(Path(a.checkpoint), Path(a.out))))


def _report(facts: dict[str, Any]) -> int:
    print(json.dumps(facts, indent=1))
    return 0


def _checkpoint_folder(path: Path) -> Path:
    from esm3.train import checkpoint as ckpt

    try:
        return ckpt.resolve(path)
    except FileNotFoundError as e:
        raise UserError(str(e)) from e


def to_esm(checkpoint: Path, out: Path) -> dict[str, Any]:
    """Write the weights of a suite checkpoint as an esm ESM3 state dict; the facts."""

    from esm3.interop.esm import IncompatibleWeights, to_esm_state_dict
    from esm3.model.esm3 import ESM3
    from esm3.train import checkpoint as ckpt

    folder = _checkpoint_folder(checkpoint)
    try:
        cfg = ckpt.model_config(ckpt.read_state(folder))
        model = ESM3(cfg, device="cpu")
        ckpt.load(folder, model, None)
        sd = to_esm_state_dict(model)
    except (ValueError, IncompatibleWeights) as e:
        raise UserError(f"{folder}: {e}") from e
    _save(sd, out)
    return {
        "checkpoint": str(folder),
        "wrote": str(out),
        "esm": f"ESM3(d_model={cfg.d_model}, n_heads={cfg.n_heads}, v_heads={cfg.n_geom_heads}, "
        f"n_layers={cfg.n_layers}, ...).load_state_dict(torch.load(...), strict=True)",
    }


def from_esm(src: Path, out: Path, n_heads: int | None = None) -> dict[str, Any]:
    """Write an esm ESM3 state dict as a suite checkpoint folder at `out`; the facts,
    with the [model] settings of a training config that matches it."""

    from esm3.interop.esm import IncompatibleWeights, from_esm_state_dict
    from esm3.train import checkpoint as ckpt

    sd = _load_state_dict(src)
    try:
        model = from_esm_state_dict(sd, n_heads=n_heads)
    except IncompatibleWeights as e:
        raise UserError(f"{src}: {e}") from e
    if out.exists():
        raise UserError(f"{out} exists; choose a new folder (nothing was written)")
    cfg = model.cfg
    staging = out.with_name(f".{out.name}.converting")
    shutil.rmtree(staging, ignore_errors=True)
    state = {"model": ckpt.fingerprint(cfg), "converted_from": str(src), "clean": True}
    ckpt.save(staging, 0, model, None, state)
    ckpt.step_dir(staging, 0).rename(out)
    staging.rmdir()
    settings = {"d_model": cfg.d_model, "n_layers": cfg.n_layers, "d_head": cfg.d_head,
                "geom_heads": cfg.n_geom_heads, "ffn_multiple": cfg.ffn_multiple}  # fmt: skip
    return {
        "source": str(src),
        "wrote": str(out),
        "parameters": sum(p.numel() for p in model.parameters()),
        "model": settings,
        "train": f"[model] {' '.join(f'{k} = {v}' for k, v in settings.items())}; "
        f'[checkpoint] init_from = "{out}"',
    }


def _load_state_dict(src: Path) -> dict[str, Any]:
    import torch

    try:
        return torch.load(src, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises pickle, zip and OS errors alike
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{src}: not a torch state dict ({first})") from e


def _save(obj: Any, out: Path) -> None:
    """torch.save, atomically (a reader never sees half a file)."""
    import torch

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, out)


def encoder_from_esm(src: Path, out: Path) -> dict[str, Any]:
    """esm's StructureTokenEncoder weights -> the suite's structure encoder file."""
    from dataclasses import asdict

    from esm3.interop.esm import IncompatibleWeights
    from esm3.interop.esm import encoder_from_esm as convert
    from esm3.model.vqvae.tokenizer import VQVAEStructureTokenizer

    try:
        encoder = convert(_load_state_dict(src))
    except IncompatibleWeights as e:
        raise UserError(f"{src}: {e}") from e
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    VQVAEStructureTokenizer(encoder, str(src.resolve())).save(tmp)
    os.replace(tmp, out)
    return {"source": str(src), "wrote": str(out), "encoder": asdict(encoder.cfg),
            "preprocess": f'[codebook] vqvae = "{out}"'}  # fmt: skip


def encoder_to_esm(checkpoint: Path, out: Path) -> dict[str, Any]:
    """A suite-trained structure tokenizer's encoder -> esm's StructureTokenEncoder weights."""
    from esm3.interop.esm import IncompatibleWeights
    from esm3.interop.esm import encoder_to_esm as convert
    from esm3.train.vqvae import load_vqvae

    folder = _checkpoint_folder(checkpoint)
    try:
        enc = load_vqvae(folder).encoder
        sd = convert(enc)
    except (ValueError, IncompatibleWeights) as e:
        raise UserError(f"{folder}: {e}") from e
    _save(sd, out)
    c = enc.cfg
    return {
        "checkpoint": str(folder),
        "wrote": str(out),
        "esm": f"StructureTokenEncoder(d_model={c.d_model}, n_heads=1, v_heads={c.geom_heads}, "
        f"n_layers={c.n_layers}, d_out={c.d_code}, n_codes={c.n_codes})"
        ".load_state_dict(torch.load(...), strict=True)",
    }
