"""The whole corruption recipe of ESM3 pre-training: Protein -> (inputs, targets, loss masks).

Conventions (all categorical tracks share the specials of `esm3.tokenize.specials`):
- A sample is `bos, chain 1, chainbreak, chain 2, ..., eos`; T positions in all.
- An input position holding MASK means "not given": masked by the track's noise schedule,
  the whole track dropped, or the value absent from the data. The loss of a track covers
  exactly the positions the corruption set to MASK and whose true value is known.
- A track absent from the data (no coordinates, no SS8, an empty annotation list ...) is
  all MASK in the input and has no loss.
- Coordinates are input only (their target is the structure-token track): hidden
  residues are NaN, shown ones carry Gaussian noise.
"""

from __future__ import annotations

import numpy as np

from esm3.tasks import augment
from esm3.tasks.config import TaskConfig, TrackNoise
from esm3.tasks.masking import iid_mask, span_mask
from esm3.tasks.sample import Protein
from esm3.tasks.schedules import rate_from_uniform, sample_mask_rate
from esm3.tokenize.coordinates import validate_coordinates
from esm3.tokenize.sasa import SASA_NAN, encode_sasa
from esm3.tokenize.sequence import encode_sequence
from esm3.tokenize.specials import BOS, CHAINBREAK, EOS, MASK, N_SPECIAL
from esm3.tokenize.ss8 import encode_ss8
from esm3.tokenize.structure_tokens import encode_structure_tokens

CATEGORICAL = ("sequence", "structure", "ss8", "sasa", "function", "residue")
Arrays = dict[str, np.ndarray]


def tokenize_protein(protein: Protein, cfg: TaskConfig) -> tuple[Arrays, dict[str, bool]]:
    """Per-residue arrays of every track, uncorrupted, without bos/eos.

    Returns (arrays, present): arrays hold sequence/structure/ss8/sasa (L,), function (L, 8),
    residue (L, 16), coords (L, 3, 3) float32 (NaN: missing), has_coords (L,) bool;
    present says which tracks the data provides.
    """
    L, rid = len(protein), protein.id
    seq = encode_sequence(protein.sequence, record=rid)
    full = lambda v: np.full(L, v, dtype=np.int64)  # noqa: E731
    if protein.coords is not None:
        coords, has = validate_coordinates(protein.coords, L, record=rid)
    else:
        coords, has = np.full((L, 3, 3), np.nan, np.float32), np.zeros(L, bool)
    arrays = {
        "sequence": seq,
        "structure": full(MASK)
        if protein.structure_tokens is None
        else encode_structure_tokens(protein.structure_tokens, cfg.codebook_size, record=rid),
        "ss8": full(MASK) if protein.ss8 is None else encode_ss8(protein.ss8, record=rid),
        "sasa": full(SASA_NAN) if protein.sasa is None else encode_sasa(protein.sasa, record=rid),
        "function": cfg.function_vocab.encode(protein.function, L, record=rid),
        "residue": cfg.residue_vocab.encode(protein.residue_annotations, L, record=rid),
        "coords": coords,
        "has_coords": has,
    }
    present = {
        "sequence": True,
        "structure": protein.structure_tokens is not None,
        "ss8": protein.ss8 is not None,
        "sasa": protein.sasa is not None,
        "function": len(protein.function) > 0 and len(cfg.function_vocab.labels) > 0,
        "residue": len(protein.residue_annotations) > 0 and len(cfg.residue_vocab.labels) > 0,
        "coords": bool(has.any()),
    }
    return arrays, present


def assemble(segments: list[tuple[int, int]], offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Positions of a sample built from residue segments.

    Returns (index (T,) residue index or -1 at specials, special (T,) the special token at
    -1 positions) for `bos, seg 1, chainbreak, seg 2, ..., eos`; `offset` is added to
    residue indices (the crop start).
    """
    parts, specs = [np.array([-1])], [np.array([BOS])]
    for c, (s, e) in enumerate(segments):
        if c:
            parts.append(np.array([-1]))
            specs.append(np.array([CHAINBREAK]))
        parts.append(np.arange(s + offset, e + offset))
        specs.append(np.full(e - s, -1))
    parts.append(np.array([-1]))
    specs.append(np.array([EOS]))
    return np.concatenate(parts), np.concatenate(specs)


def _chain_ids(segments: list[tuple[int, int]]) -> np.ndarray:
    lens = [e - s for s, e in segments]
    # bos and chain 1 -> 0; each chainbreak and the chain after it -> c; eos -> last chain
    reps = [1 + lens[0]] + [1 + n for n in lens[1:]] + [1]
    ids = list(range(len(segments))) + [len(segments) - 1]
    return np.repeat(np.asarray(ids, dtype=np.int64), reps)


_SPECIAL_TAIL = np.arange(N_SPECIAL, dtype=np.int64)


def _with_special_tail(tokens: np.ndarray) -> np.ndarray:
    """tokens with rows for the special ids appended, so that `tail[L + s]` is special s."""
    if tokens.ndim == 1:
        return np.concatenate([tokens, _SPECIAL_TAIL])
    return np.concatenate([tokens, np.repeat(_SPECIAL_TAIL[:, None], tokens.shape[1], axis=1)])


def _crop(L: int, cfg: TaskConfig, rng: np.random.Generator) -> int:
    keep = cfg.max_length - 2
    return int(rng.integers(0, L - keep + 1)) if L > keep else 0


def _valid_target(name: str, tokens: np.ndarray, is_res: np.ndarray) -> np.ndarray:
    if name == "structure" or name == "ss8":
        return is_res & (tokens != MASK)
    if name == "sasa":
        return is_res & (tokens != SASA_NAN)
    return is_res


def corrupt(
    protein: Protein, rng: np.random.Generator, cfg: TaskConfig
) -> tuple[Arrays, Arrays, Arrays]:
    """Apply the full pre-training corruption to one protein.

    Order: tokenize; crop to `cfg.max_length - 2` residues (random window); tertiary
    interface sampling (structure present, `interface_prob`) or else residue gap
    augmentation; per-track noise and track dropout (Table S6); coordinates by atomic
    coordination sampling (`coordination_prob`) or else dropout / span or i.i.d. masking;
    Gaussian noise on shown coordinates.

    Returns (inputs, targets, loss_masks):
      inputs: sequence, structure, ss8, sasa (T,) int64; function (T, 8), residue (T, 16)
        int64; coords (T, 3, 3) float32 Angstrom (NaN: not given); chain_id (T,) int64;
        residue_index (T,) int64 (-1 at specials).
      targets: the six categorical tracks, uncorrupted, same shapes as the inputs.
      loss_masks: the six categorical tracks, (T,) bool.
    """
    arrays, present = tokenize_protein(protein, cfg)
    L = len(protein)
    tails = {name: _with_special_tail(arrays[name]) for name in CATEGORICAL}
    start = _crop(L, cfg, rng)
    n = min(L, cfg.max_length - 2)
    coords_raw = arrays["coords"][start : start + n]
    has_raw = arrays["has_coords"][start : start + n]

    segments = None
    if present["coords"] and rng.random() < cfg.interface_prob:
        got = augment.interface_segments(
            coords_raw[:, 1],
            has_raw,
            rng,
            contact=cfg.interface_contact,
            min_sep=cfg.interface_min_sep,
        )
        if got is not None:
            segments = got[0]
    if segments is None:
        segments = augment.gap_segments(
            n,
            rng,
            p=cfg.gap_chain_p,
            max_chains=cfg.gap_max_chains,
            min_gap=cfg.gap_min,
            alpha=cfg.gap_dirichlet_alpha,
        )
    index, special = assemble(segments, start)
    is_res = index >= 0
    gather = np.where(is_res, index, L + special)  # specials sit in the arrays' tail
    T = index.size

    draws = rng.random((len(CATEGORICAL), 2))  # (dropout draw, schedule draw) per track
    keep = rng.random((len(CATEGORICAL), T))
    inputs: Arrays = {}
    targets: Arrays = {}
    loss_masks: Arrays = {}
    for k, name in enumerate(CATEGORICAL):
        tokens = tails[name][gather]
        noise: TrackNoise = getattr(cfg, name)
        if not present[name]:
            corrupted = is_res
            loss = np.zeros(T, dtype=bool)
        else:
            if draws[k, 0] < noise.dropout:
                corrupted = is_res
            else:
                rate = rate_from_uniform(
                    noise.schedule, draws[k, 1], rng, beta_fraction=cfg.betalinear_beta_fraction
                )
                corrupted = is_res & (keep[k] < rate)
            loss = corrupted & _valid_target(name, tokens, is_res)
        targets[name] = tokens
        inputs[name] = np.where(corrupted[:, None] if tokens.ndim == 2 else corrupted, MASK, tokens)
        loss_masks[name] = loss

    coords = np.concatenate([arrays["coords"], np.full((N_SPECIAL, 3, 3), np.nan, np.float32)])
    coords = coords[gather]
    has = np.concatenate([arrays["has_coords"], np.zeros(N_SPECIAL, bool)])[gather]
    shown = np.zeros(T, dtype=bool)
    if present["coords"]:
        picked = None
        if rng.random() < cfg.coordination_prob:
            picked = augment.coordination_residues(
                coords[:, 1],
                has,
                index,
                rng,
                contact=cfg.coordination_contact,
                min_sep=cfg.coordination_min_sep,
                neighbor_prob=cfg.coordination_neighbor_prob,
            )
        if picked is not None:
            shown[picked[1]] = True
        elif not (cfg.coordinates.dropout > 0 and rng.random() < cfg.coordinates.dropout):
            rate = sample_mask_rate(cfg.coordinates.schedule, rng)
            if rng.random() < cfg.span_drop_prob:
                hidden = span_mask(T, rate, rng, cfg.max_spans)
            else:
                hidden = iid_mask(T, rate, rng)
            shown = has & ~hidden
    noisy = coords + rng.standard_normal(coords.shape, dtype=np.float32) * np.float32(
        cfg.coord_noise_sd
    )
    inputs["coords"] = np.where(shown[:, None, None], noisy, np.float32(np.nan))
    inputs["chain_id"] = _chain_ids(segments)
    inputs["residue_index"] = index
    return inputs, targets, loss_masks


def inverse_folding_corrupt(
    protein: Protein, rng: np.random.Generator, cfg: TaskConfig
) -> tuple[Arrays, Arrays, Arrays]:
    """The inverse folding task: sequence from structure, loss on sequence only.

    All residues with coordinates are shown (with Gaussian noise); the sequence and every
    other track are MASK. Same output layout as `corrupt`. Raises ValueError when the
    protein has no coordinates.
    """
    arrays, present = tokenize_protein(protein, cfg)
    if not present["coords"]:
        raise ValueError(f"protein {protein.id!r}: inverse folding needs coordinates")
    L = len(protein)
    start = _crop(L, cfg, rng)
    n = min(L, cfg.max_length - 2)
    index, special = assemble([(0, n)], start)
    is_res = index >= 0
    gather = np.where(is_res, index, 0)
    inputs: Arrays = {}
    targets: Arrays = {}
    loss_masks: Arrays = {}
    for name in CATEGORICAL:
        tokens = arrays[name][gather]
        if tokens.ndim == 2:
            tokens[~is_res] = special[~is_res, None]
        else:
            tokens = np.where(is_res, tokens, special)
        targets[name] = tokens
        inp = tokens.copy()
        inp[is_res] = MASK
        inputs[name] = inp
        loss_masks[name] = is_res.copy() if name == "sequence" else np.zeros(index.size, bool)
    coords = arrays["coords"][gather]
    shown = is_res & arrays["has_coords"][gather]
    noisy = coords + rng.standard_normal(coords.shape, dtype=np.float32) * np.float32(
        cfg.coord_noise_sd
    )
    inputs["coords"] = np.where(shown[:, None, None], noisy, np.float32(np.nan))
    inputs["chain_id"] = np.zeros(index.size, dtype=np.int64)
    inputs["residue_index"] = index
    return inputs, targets, loss_masks
