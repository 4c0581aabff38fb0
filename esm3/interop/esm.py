"""Weights and calls across to EvolutionaryScale's `esm` ESM3 (never imported here).

The suite's model has `esm`'s architecture, inputs and token ids, so a checkpoint crosses
by renaming tensors: `to_esm_state_dict` gives a state dict that `esm.models.esm3.ESM3`
loads with strict=True; `from_esm_state_dict` builds the suite's model from one, its shape
read from the tensors; `forward_like_esm` calls the suite's model with `esm`'s forward
keywords and returns `esm`'s output names. The VQ-VAE's structure encoder crosses the same
way: `encoder_to_esm` for `esm.models.vqvae.StructureTokenEncoder`, `encoder_from_esm`
back.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import replace

import torch

from esm3.model.config import ModelConfig
from esm3.model.esm3 import ESM3
from esm3.model.vqvae.config import EncoderConfig
from esm3.model.vqvae.encoder import StructureEncoder, ffn_hidden
from esm3.tokenize import sequence as seq_vocab
from esm3.tokenize.function_tokens import FUNCTION_VOCAB_SIZE
from esm3.tokenize.specials import N_STRUCTURE_SPECIAL
from esm3.tokenize.structure_tokens import structure_vocab_size
from esm3.tokenize.tracks import CATEGORICAL_TRACKS, TrackSizes

#: esm's output names of the suite's head tracks
OUTPUT_NAMES = {
    "sequence": "sequence_logits",
    "structure": "structure_logits",
    "ss8": "secondary_structure_logits",
    "sasa": "sasa_logits",
    "function": "function_logits",
    "residue": "residue_logits",
}
#: esm's forward keywords -> the suite's
INPUT_NAMES = {
    "sequence_tokens": "sequence",
    "structure_tokens": "structure",
    "ss8_tokens": "ss8",
    "sasa_tokens": "sasa",
    "function_tokens": "function",
    "residue_annotation_tokens": "residue",
    "average_plddt": "average_plddt",
    "per_res_plddt": "per_res_plddt",
    "structure_coords": "coords",
    "chain_id": "chain_id",
    "sequence_id": "sequence_id",
}

# (suite name, esm name) patterns; {i} a block, {h} a head's layer, {s} a function slot
_EMBED = [
    ("embed.sequence.weight", "encoder.sequence_embed.weight"),
    ("embed.structure.weight", "encoder.structure_tokens_embed.weight"),
    ("embed.ss8.weight", "encoder.ss8_embed.weight"),
    ("embed.sasa.weight", "encoder.sasa_embed.weight"),
    ("embed.residue.weight", "encoder.residue_embed.weight"),
    ("embed.function.{s}.weight", "encoder.function_embed.{s}.weight"),
    ("embed.average_plddt.{p}", "encoder.plddt_projection.{p}"),
    ("embed.per_res_plddt.{p}", "encoder.structure_per_res_plddt_projection.{p}"),
]
_BLOCK = [
    ("attn.norm.{p}", "attn.layernorm_qkv.0.{p}"),
    ("attn.qkv.weight", "attn.layernorm_qkv.1.weight"),
    ("attn.out.weight", "attn.out_proj.weight"),
    ("attn.q_norm.weight", "attn.q_ln.weight"),
    ("attn.k_norm.weight", "attn.k_ln.weight"),
    ("geom.norm.weight", "geom_attn.s_norm.weight"),
    ("geom.proj.weight", "geom_attn.proj.weight"),
    ("geom.out.weight", "geom_attn.out_proj.weight"),
    ("geom.dist_weight", "geom_attn.distance_scale_per_head"),
    ("geom.rot_weight", "geom_attn.rotation_scale_per_head"),
    ("ffn.norm.{p}", "ffn.0.{p}"),
    ("ffn.w12.weight", "ffn.1.weight"),
    ("ffn.w3.weight", "ffn.3.weight"),
]
_HEAD_NAMES = {"sequence": "sequence_head", "structure": "structure_head", "ss8": "ss8_head",
               "sasa": "sasa_head", "function": "function_head", "residue": "residue_head"}  # fmt: skip


class IncompatibleWeights(ValueError):
    """A state dict or model that the other side cannot hold: one line saying why."""


def _pattern(template: str) -> re.Pattern:
    rx = re.escape(template)
    for field, group in (("{i}", r"(?P<i>\d+)"), ("{s}", r"(?P<s>\d+)"),
                         ("{p}", r"(?P<p>weight|bias)")):  # fmt: skip
        rx = rx.replace(re.escape(field), group)
    return re.compile(rx + "$")


def _rules() -> list[tuple[str, str]]:
    rules = list(_EMBED)
    rules += [
        (f"layers.{{i}}.{ours}", f"transformer.blocks.{{i}}.{theirs}") for ours, theirs in _BLOCK
    ]
    rules += [("norm.weight", "transformer.norm.weight")]
    for track, head in _HEAD_NAMES.items():
        rules += [
            (f"heads.{track}.net.{k}.{{p}}", f"output_heads.{head}.{k}.{{p}}") for k in (0, 2, 3)
        ]
    return rules


def _rename(
    names: list[str], source: int, rules: list[tuple[str, str]] | None = None
) -> dict[str, str]:
    """name -> name on the other side; source 0: suite names in, 1: esm names in; `rules`
    default: ESM3's."""
    compiled = [(_pattern(r[source]), r[1 - source]) for r in (rules or _rules())]
    out: dict[str, str] = {}
    for name in names:
        for rx, target in compiled:
            m = rx.match(name)
            if m:
                out[name] = target.format(**m.groupdict())
                break
    return out


def _check_convertible(cfg: ModelConfig) -> None:
    why = []
    if cfg.layer_pattern != "esm3":
        why.append(
            f"layer pattern {cfg.layer_pattern!r} (esm's ESM3 has geometric attention in block 0 only)"
        )
    if set(cfg.heads) != set(CATEGORICAL_TRACKS):
        why.append(f"heads {sorted(cfg.heads)} (esm's ESM3 has all six)")
    if not cfg.scale_residue:
        why.append("unscaled residual branches (esm's ESM3 divides them by sqrt(n_layers / 36))")
    if cfg.backend.linear != "torch":
        why.append("TransformerEngine layers (convert a checkpoint, which holds torch names)")
    if cfg.tracks.sequence != seq_vocab.VOCAB_SIZE or cfg.tracks.function != FUNCTION_VOCAB_SIZE:
        why.append(f"track sizes {cfg.tracks}")
    if why:
        raise IncompatibleWeights(f"model {cfg.name!r} cannot become esm's ESM3: " + "; ".join(why))


def to_esm_state_dict(model: ESM3) -> dict[str, torch.Tensor]:
    """The model's weights under `esm`'s names, for `esm.models.esm3.ESM3(d_model,
    n_heads, v_heads, n_layers, ...)` with d_model, n_heads = d_model / d_head, v_heads =
    the geometric heads and n_layers of `model.cfg`. Raises IncompatibleWeights for a model
    esm's class cannot hold (another layer pattern, missing heads)."""
    _check_convertible(model.cfg)
    ours = model.state_dict()
    names = _rename(list(ours), 0)
    left = [n for n in ours if n not in names]
    if left:
        raise IncompatibleWeights(f"no esm name for {len(left)} tensors, e.g. {left[:3]}")
    return {names[n]: t.detach().clone() for n, t in ours.items()}


def _unwrap(state_dict: Mapping) -> Mapping:
    for key in ("model", "state_dict"):
        if key in state_dict and isinstance(state_dict[key], Mapping):
            return state_dict[key]
    return state_dict


def _shape(sd: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...]:
    if key not in sd:
        raise IncompatibleWeights(f"esm state dict has no {key!r}: not an ESM3 state dict")
    return tuple(sd[key].shape)


def esm_config(
    state_dict: Mapping[str, torch.Tensor], *, n_heads: int | None = None, **fields: object
) -> ModelConfig:
    """The suite's ModelConfig of an `esm` ESM3 state dict, read from its tensor shapes.
    Attention heads cannot be read from tensors: `n_heads` (default d_model / 64, the head
    width of every released ESM3)."""
    sd = _unwrap(state_dict)
    rows, d = _shape(sd, "encoder.sequence_embed.weight")
    n_layers = len({k.split(".")[2] for k in sd if k.startswith("transformer.blocks.")})
    (v_heads,) = _shape(sd, "transformer.blocks.0.geom_attn.distance_scale_per_head")
    hidden = _shape(sd, "transformer.blocks.0.ffn.3.weight")[1]
    codebook = _shape(sd, "output_heads.structure_head.3.weight")[0]
    residue = _shape(sd, "encoder.residue_embed.weight")[0]
    function = _shape(sd, "encoder.function_embed.0.weight")[0]
    heads = n_heads or max(1, d // 64)
    if d % heads:
        raise IncompatibleWeights(f"d_model {d} is not a multiple of n_heads {heads}")
    tracks = TrackSizes(sequence=rows, structure=structure_vocab_size(codebook),
                        function=function, residue=residue)  # fmt: skip
    if tracks.structure != _shape(sd, "encoder.structure_tokens_embed.weight")[0]:
        raise IncompatibleWeights(
            f"structure embedding has {_shape(sd, 'encoder.structure_tokens_embed.weight')[0]} "
            f"rows, expected codebook {codebook} + {N_STRUCTURE_SPECIAL} specials"
        )
    cfg = ModelConfig(name="esm3-from-esm", d_model=d, n_layers=n_layers, d_head=d // heads,
                      ffn_ratio=8 / 3, ffn_multiple=256, geom_heads=v_heads, tracks=tracks)  # fmt: skip
    cfg = replace(cfg, **fields)  # type: ignore[arg-type]
    if cfg.ffn_hidden != hidden:
        raise IncompatibleWeights(
            f"feed-forward width {hidden} is not esm's rule for d_model {d} ({cfg.ffn_hidden})"
        )
    return cfg


def from_esm_state_dict(
    state_dict: Mapping[str, torch.Tensor], *, n_heads: int | None = None, **fields: object
) -> ESM3:
    """The suite's model holding an `esm` ESM3 state dict (shapes inferred from the tensors;
    `fields` override ModelConfig fields such as context_length or backend). Raises
    IncompatibleWeights naming the missing, unexpected or mis-shaped tensors."""
    sd = _unwrap(state_dict)
    cfg = esm_config(sd, n_heads=n_heads, **fields)
    model = ESM3(cfg)
    _load_esm_weights(model, sd, _rules(), "ESM3")
    return model


def _load_esm_weights(
    module: torch.nn.Module, sd: Mapping[str, torch.Tensor], rules: list[tuple[str, str]],
    what: str,
) -> None:  # fmt: skip
    """Load an `esm` state dict into `module` under the renaming `rules`, strictly; raises
    IncompatibleWeights naming missing (by esm's names), unexpected or mis-shaped tensors."""
    names = _rename(list(sd), 1, rules)
    unknown = sorted(set(sd) - set(names))
    ours = {names[k]: v for k, v in sd.items() if k in names}
    expected = module.state_dict()
    missing = sorted(set(expected) - set(ours))
    wrong = [f"{k} {tuple(ours[k].shape)} (expected {tuple(v.shape)})"
             for k, v in expected.items() if k in ours and ours[k].shape != v.shape]  # fmt: skip
    problems = []
    if missing:
        esm_missing = _rename(missing[:3], 0, rules)
        shown = [esm_missing.get(n, n) for n in missing[:3]]
        problems.append(f"missing {len(missing)} tensors (e.g. {shown})")
    if unknown:
        problems.append(f"{len(unknown)} unexpected tensors (e.g. {unknown[:3]})")
    if wrong:
        problems.append(f"{len(wrong)} of another shape (e.g. {wrong[:2]})")
    if problems:
        raise IncompatibleWeights(f"esm state dict does not fit {what}: " + "; ".join(problems))
    module.load_state_dict({k: v.to(expected[k].dtype) for k, v in ours.items()}, strict=True)


def forward_like_esm(model: ESM3, **kwargs: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The model called as `esm`'s ESM3.forward: `esm`'s keywords (sequence_tokens,
    structure_tokens, ss8_tokens, sasa_tokens, function_tokens, residue_annotation_tokens,
    average_plddt, per_res_plddt, structure_coords, chain_id, sequence_id; any may be
    absent), `esm`'s rotary positions (0..T-1 along the row) and -1 structure tokens as
    MASK; returns logits under `esm`'s output names."""
    unknown = set(kwargs) - set(INPUT_NAMES)
    if unknown:
        raise TypeError(f"forward_like_esm got unknown keywords {sorted(unknown)}")
    inputs = {INPUT_NAMES[k]: v for k, v in kwargs.items() if v is not None}
    ref = next(v for v in inputs.values() if v.dim() >= 2)
    B, T = ref.shape[:2]
    st = inputs.get("structure")
    if st is not None:
        inputs["structure"] = st.masked_fill(st == -1, model.cfg.tracks.specials("structure").mask)
    inputs["positions"] = torch.arange(T, device=ref.device).expand(B, T)
    out = model(**inputs)
    return {OUTPUT_NAMES[t]: v for t, v in out.logits.items()}


# the structure encoder: esm's StructureTokenEncoder (its knn 16 and +-32 bins are fixed)
_ENCODER_BLOCK = [
    ("geom.norm.{p}", "geom_attn.s_norm.{p}"),
    ("geom.proj.{p}", "geom_attn.proj.{p}"),
    ("geom.out.{p}", "geom_attn.out_proj.{p}"),
    ("geom.dist_weight", "geom_attn.distance_scale_per_head"),
    ("geom.rot_weight", "geom_attn.rotation_scale_per_head"),
    ("ffn.norm.{p}", "ffn.0.{p}"),
    ("ffn.w12.{p}", "ffn.1.{p}"),
    ("ffn.w3.{p}", "ffn.3.{p}"),
]
_ENCODER_FIXED = {"knn": 16, "rel_pos_bins": 32}


def _encoder_rules() -> list[tuple[str, str]]:
    rules = [
        (f"blocks.{{i}}.{ours}", f"transformer.blocks.{{i}}.{theirs}")
        for ours, theirs in _ENCODER_BLOCK
    ]
    rules += [("rel_pos.weight", "relative_positional_embedding.embedding.weight"),
              ("pre_vq.{p}", "pre_vq_proj.{p}")]  # fmt: skip
    rules += [(f"codebook.{b}", f"codebook.{b}") for b in ("embeddings", "N", "z_avg")]
    return rules


def _encoder_shape(sd: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...]:
    if key not in sd:
        raise IncompatibleWeights(
            f"esm state dict has no {key!r}: not a StructureTokenEncoder state dict"
        )
    return tuple(sd[key].shape)


def encoder_esm_config(
    state_dict: Mapping[str, torch.Tensor], **fields: object
) -> EncoderConfig:
    """The EncoderConfig of an `esm` StructureTokenEncoder state dict, read from its tensor
    shapes (`fields` override the training-only ones: ema_decay, restart_threshold, ...)."""
    sd = _unwrap(state_dict)
    rows, d = _encoder_shape(sd, "relative_positional_embedding.embedding.weight")
    n_layers = len({k.split(".")[2] for k in sd if k.startswith("transformer.blocks.")})
    if n_layers == 0:
        raise IncompatibleWeights("esm state dict has no transformer.blocks: not an encoder")
    d_out, three_heads = _encoder_shape(sd, "transformer.blocks.0.geom_attn.out_proj.weight")
    proj = _encoder_shape(sd, "transformer.blocks.0.geom_attn.proj.weight")
    n_codes, d_code = _encoder_shape(sd, "codebook.embeddings")
    hidden = _encoder_shape(sd, "transformer.blocks.0.ffn.3.weight")[1]
    why = []
    if three_heads % 3 or proj != (5 * three_heads, d) or d_out != d:
        why.append(f"geometric attention proj {proj} / out_proj {(d_out, three_heads)} "
                   f"do not fit d_model {d}")  # fmt: skip
    if rows != 2 * _ENCODER_FIXED["rel_pos_bins"] + 2:
        why.append(f"{rows} relative-position rows (esm has {2 * 32 + 2})")
    if hidden != ffn_hidden(d):
        why.append(f"feed-forward width {hidden} is not esm's rule for d_model {d}")
    if why:
        raise IncompatibleWeights("esm encoder state dict does not fit: " + "; ".join(why))
    cfg = EncoderConfig(d_model=d, n_layers=n_layers, geom_heads=three_heads // 3,
                        d_code=d_code, n_codes=n_codes)  # fmt: skip
    return replace(cfg, **fields)  # type: ignore[arg-type]


def encoder_from_esm(
    state_dict: Mapping[str, torch.Tensor], **fields: object
) -> StructureEncoder:
    """The suite's StructureEncoder holding an `esm` StructureTokenEncoder state dict (shapes
    inferred from the tensors; `fields` override training-only EncoderConfig fields).
    Raises IncompatibleWeights naming missing, unexpected or mis-shaped tensors."""
    sd = _unwrap(state_dict)
    cfg = encoder_esm_config(sd, **fields)
    encoder = StructureEncoder(cfg)
    _load_esm_weights(encoder, sd, _encoder_rules(), "the encoder")
    return encoder


def encoder_to_esm(encoder: StructureEncoder) -> dict[str, torch.Tensor]:
    """The encoder's weights and codebook under `esm`'s names, for
    `esm.models.vqvae.StructureTokenEncoder(d_model, n_heads=1, v_heads=geom_heads,
    n_layers, d_out=d_code, n_codes)` with strict=True. Raises IncompatibleWeights where
    esm's class cannot hold the encoder (it fixes knn 16 and relative positions +-32)."""
    cfg = encoder.cfg
    off = [f"{k} {getattr(cfg, k)} (esm: {v})" for k, v in _ENCODER_FIXED.items()
           if getattr(cfg, k) != v]  # fmt: skip
    if off:
        raise IncompatibleWeights("encoder cannot become esm's: " + "; ".join(off))
    ours = encoder.state_dict()
    names = _rename(list(ours), 0, _encoder_rules())
    left = [n for n in ours if n not in names]
    if left:
        raise IncompatibleWeights(f"no esm name for {len(left)} tensors, e.g. {left[:3]}")
    return {names[n]: t.detach().clone() for n, t in ours.items()}


__all__ = ["IncompatibleWeights", "encoder_esm_config", "encoder_from_esm", "encoder_to_esm",
           "esm_config", "forward_like_esm", "from_esm_state_dict",
           "to_esm_state_dict"]  # fmt: skip
