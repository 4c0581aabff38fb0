"""The whole corruption recipe of ESM3 pre-training: Protein -> (inputs, targets, loss masks).

Conventions (token ids are `esm`'s, per track: `esm3.tokenize.specials`):
- A sample is `bos, chain 1, chainbreak, chain 2, ..., eos`; T positions in all. A protein
  longer than `max_length - 2` residues becomes a random window of `max_length` residues
  without BOS/EOS (A.1.3: their absence marks a fragment).
- An input position holding its track's mask id means "not given": masked by the track's
  noise schedule, the whole track dropped, or the value absent from the data (the mask is
  `<mask>` for sequence and structure, `<pad>` (0) for SS8, SASA, function and residue
  annotations, as `esm` fills them). The loss of a track covers exactly the positions the
  corruption masked and whose true value is known.
- A track absent from the data (no coordinates, no SS8, no annotations ...) is all mask in
  the input and has no loss.
- Coordinates are input only (their target is the structure-token track): hidden
  residues are NaN, shown ones carry Gaussian noise. pLDDT conditioning: a predicted
  structure's mean and per-residue pLDDT; otherwise `esm`'s defaults (1 and 0).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from esm3.tasks import augment
from esm3.tasks.config import TaskConfig, TrackNoise
from esm3.tasks.masking import iid_mask, span_mask
from esm3.tasks.sample import Protein
from esm3.tasks.schedules import rate_from_uniform, sample_mask_rate
from esm3.tokenize.coordinates import validate_coordinates
from esm3.tokenize.function_tokens import FUNCTION_DEPTH
from esm3.tokenize.sasa import SASA_NAN, encode_sasa
from esm3.tokenize.sequence import encode_sequence
from esm3.tokenize.specials import PAD, TrackSpecials
from esm3.tokenize.ss8 import encode_ss8
from esm3.tokenize.structure_tokens import encode_structure_tokens

CATEGORICAL = ("sequence", "structure", "ss8", "sasa", "function", "residue")
Arrays = dict[str, np.ndarray]
BOS_AT, EOS_AT, CHAINBREAK_AT = 0, 1, 2  # kinds of special position, as `assemble` marks them
_KINDS = (BOS_AT, EOS_AT, CHAINBREAK_AT)


def _function_tokens(protein: Protein, cfg: TaskConfig, rng: np.random.Generator | None):
    tok = cfg.function_tokenizer
    L = len(protein)
    if tok is None or not protein.function:
        return np.full((L, FUNCTION_DEPTH), PAD, dtype=np.int64)
    return tok.encode(
        protein.function, L, rng=rng, record=protein.id,
        keyword_dropout=cfg.keyword_dropout if rng is not None else 0.0,
        annotation_dropout=cfg.annotation_dropout if rng is not None else 0.0,
    )  # fmt: skip


def _residue_tokens(protein: Protein, cfg: TaskConfig) -> np.ndarray:
    L = len(protein)
    vocab = cfg.residue_vocab
    if not protein.residue_annotations or not vocab.labels:
        return np.full((L, vocab.depth), PAD, dtype=np.int64)
    return vocab.encode(protein.residue_annotations, L, record=protein.id)


def tokenize_protein(
    protein: Protein, cfg: TaskConfig, rng: np.random.Generator | None = None
) -> tuple[Arrays, dict[str, bool]]:
    """Per-residue arrays of every track, uncorrupted, without bos/eos.

    Returns (arrays, present): arrays hold sequence/structure/ss8/sasa (L,), function (L, 8),
    residue (L, 16), coords (L, 3, 3) float32 (NaN: missing), has_coords (L,) bool, plddt
    (L,) float32 (NaN: none); present says which tracks the data provides. With `rng`,
    function tokens get the training-time keyword and annotation dropout.
    """
    L, rid = len(protein), protein.id
    sizes = cfg.track_sizes()
    seq = encode_sequence(protein.sequence, record=rid)
    full = lambda v: np.full(L, v, dtype=np.int64)  # noqa: E731
    if protein.coords is not None:
        coords, has = validate_coordinates(protein.coords, L, record=rid)
    else:
        coords, has = np.full((L, 3, 3), np.nan, np.float32), np.zeros(L, bool)
    function = _function_tokens(protein, cfg, rng)
    residue = _residue_tokens(protein, cfg)
    arrays = {
        "sequence": seq,
        "structure": full(sizes.specials("structure").mask)
        if protein.structure_tokens is None
        else encode_structure_tokens(protein.structure_tokens, cfg.codebook_size, record=rid),
        "ss8": full(PAD) if protein.ss8 is None else encode_ss8(protein.ss8, record=rid),
        "sasa": full(SASA_NAN) if protein.sasa is None else encode_sasa(protein.sasa, record=rid),
        "function": function,
        "residue": residue,
        "coords": coords,
        "has_coords": has,
        "plddt": np.full(L, np.nan, np.float32) if protein.plddt is None else protein.plddt,
    }
    present = {
        "sequence": True,
        "structure": protein.structure_tokens is not None,
        "ss8": protein.ss8 is not None,
        "sasa": protein.sasa is not None,
        "function": bool((function[:, 0] != PAD).any()),
        "residue": bool((residue[:, 0] != PAD).any()),
        "coords": bool(has.any()),
    }
    return arrays, present


def assemble(
    segments: list[tuple[int, int]], offset: int = 0, *, ends: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Positions of a sample built from residue segments.

    Returns (index (T,) residue index or -1 at specials, special (T,) the kind of special
    position (BOS_AT, EOS_AT, CHAINBREAK_AT) at -1 positions) for `bos, seg 1, chainbreak,
    seg 2, ..., eos` (without bos and eos when `ends` is False: a fragment); `offset` is
    added to residue indices (the crop start).
    """
    parts = [np.array([-1])] if ends else []
    specs = [np.array([BOS_AT])] if ends else []
    for c, (s, e) in enumerate(segments):
        if c:
            parts.append(np.array([-1]))
            specs.append(np.array([CHAINBREAK_AT]))
        parts.append(np.arange(s + offset, e + offset))
        specs.append(np.full(e - s, -1))
    if ends:
        parts.append(np.array([-1]))
        specs.append(np.array([EOS_AT]))
    return np.concatenate(parts), np.concatenate(specs)


def _chain_ids(segments: list[tuple[int, int]], ends: bool = True) -> np.ndarray:
    lens = [e - s for s, e in segments]
    # bos and chain 1 -> 0; each chainbreak and the chain after it -> c; eos -> last chain
    reps = [int(ends) + lens[0]] + [1 + n for n in lens[1:]] + ([1] if ends else [])
    ids = list(range(len(segments))) + ([len(segments) - 1] if ends else [])
    return np.repeat(np.asarray(ids, dtype=np.int64), reps)


def _special_rows(sp: TrackSpecials) -> np.ndarray:
    """The track's ids at a BOS, EOS and chainbreak position, in `assemble`'s kind order."""
    return np.array([sp.bos, sp.eos, sp.chainbreak], dtype=np.int64)


def _gather(arr: np.ndarray, gather: np.ndarray, fill: object) -> np.ndarray:
    """`arr`'s rows at a sample's positions: residue i at `gather == i`, the special of kind
    k at `gather == L + k`, which takes `fill` (one value, or one per kind in `assemble`'s
    order; the 2-D tracks hold it in every slot)."""
    fill = np.asarray(fill, dtype=arr.dtype)
    fill = fill.reshape(fill.shape + (1,) * (arr.ndim - fill.ndim))
    tail = np.broadcast_to(fill, (len(_KINDS),) + arr.shape[1:])
    return np.concatenate([arr, tail])[gather]


def _noisy_shown(
    coords: np.ndarray, shown: np.ndarray, rng: np.random.Generator, sd: float
) -> np.ndarray:
    """Coordinates with Gaussian noise where shown, NaN elsewhere."""
    noisy = coords + rng.standard_normal(coords.shape, dtype=np.float32) * np.float32(sd)
    return np.where(shown[:, None, None], noisy, np.float32(np.nan))


def _crop(L: int, cfg: TaskConfig, rng: np.random.Generator) -> tuple[int, int, bool]:
    """(start, residues kept, with bos/eos): a protein that does not fit with its BOS and
    EOS becomes a window of max_length residues without them."""
    if L <= cfg.max_length - 2:
        return 0, L, True
    n = min(L, cfg.max_length)
    return int(rng.integers(0, L - n + 1)), n, False


def _valid_target(
    name: str, tokens: np.ndarray, is_res: np.ndarray, sp: TrackSpecials
) -> np.ndarray:
    if tokens.ndim == 2:  # function, residue: a protein's annotated residues
        return is_res & (tokens[:, 0] != PAD)
    if name == "sequence":
        return is_res
    return is_res & (tokens != sp.mask)  # structure without coordinates; SS8/SASA unknown


def _plddt_inputs(plddt: np.ndarray, gather: np.ndarray, is_res: np.ndarray) -> Arrays:
    """average_plddt and per_res_plddt (T,) float32: a predicted structure's mean pLDDT at
    every position and its per-residue pLDDT at residues; esm's 1 and 0 without one."""
    T = gather.size
    if not np.isfinite(plddt).any():
        return {"average_plddt": np.ones(T, np.float32), "per_res_plddt": np.zeros(T, np.float32)}
    mean = np.float32(np.nanmean(plddt))
    per_res = _gather(plddt, gather, 0)
    per_res = np.where(is_res & np.isfinite(per_res), per_res, np.float32(0))
    return {"average_plddt": np.full(T, mean, np.float32), "per_res_plddt": per_res}


def corrupt(
    protein: Protein, rng: np.random.Generator, cfg: TaskConfig
) -> tuple[Arrays, Arrays, Arrays]:
    """Apply the full pre-training corruption to one protein.

    Order: tokenize; crop (a random window of `cfg.max_length` residues, without BOS/EOS,
    when the protein does not fit with them); tertiary
    interface sampling (structure present, `interface_prob`) or else residue gap
    augmentation; per-track noise and track dropout (Table S6); coordinates by atomic
    coordination sampling (`coordination_prob`) or else dropout / span or i.i.d. masking;
    Gaussian noise on shown coordinates.

    Returns (inputs, targets, loss_masks):
      inputs: sequence, structure, ss8, sasa (T,) int64; function (T, 8), residue (T, 16)
        int64; coords (T, 3, 3) float32 Angstrom (NaN: not given); chain_id (T,) int64;
        residue_index (T,) int64 (-1 at specials); average_plddt, per_res_plddt (T,) float32.
      targets: the six categorical tracks, uncorrupted, same shapes as the inputs.
      loss_masks: the six categorical tracks, (T,) bool.
    """
    arrays, present = tokenize_protein(protein, cfg, rng)
    L = len(protein)
    sizes = cfg.track_sizes()
    specials = {name: sizes.specials(name) for name in CATEGORICAL}
    start, n, ends = _crop(L, cfg, rng)
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
    index, special = assemble(segments, start, ends=ends)
    is_res = index >= 0
    gather = np.where(is_res, index, L + special)  # specials sit in the arrays' tail
    T = index.size

    draws = rng.random((len(CATEGORICAL), 2))  # (dropout draw, schedule draw) per track
    keep = rng.random((len(CATEGORICAL), T))
    inputs: Arrays = {}
    targets: Arrays = {}
    loss_masks: Arrays = {}
    for k, name in enumerate(CATEGORICAL):
        tokens = _gather(arrays[name], gather, _special_rows(specials[name]))
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
            loss = corrupted & _valid_target(name, tokens, is_res, specials[name])
        targets[name] = tokens
        hide = corrupted[:, None] if tokens.ndim == 2 else corrupted
        inputs[name] = np.where(hide, specials[name].mask, tokens)
        loss_masks[name] = loss

    coords = _gather(arrays["coords"], gather, np.nan)
    has = _gather(arrays["has_coords"], gather, False)
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
    inputs["coords"] = _noisy_shown(coords, shown, rng, cfg.coord_noise_sd)
    inputs["chain_id"] = _chain_ids(segments, ends)
    inputs["residue_index"] = index
    inputs |= _plddt_inputs(arrays["plddt"], gather, is_res)
    return inputs, targets, loss_masks


def inverse_folding_corrupt(
    protein: Protein, rng: np.random.Generator, cfg: TaskConfig
) -> tuple[Arrays, Arrays, Arrays]:
    """The inverse folding task: sequence from structure, loss on sequence only.

    All residues with coordinates are shown (with Gaussian noise); the sequence and every
    other track are masked. Same output layout as `corrupt`. Raises ValueError when the
    protein has no coordinates.
    """
    arrays, present = tokenize_protein(protein, cfg)
    if not present["coords"]:
        raise ValueError(f"protein {protein.id!r}: inverse folding needs coordinates")
    L = len(protein)
    sizes = cfg.track_sizes()
    start, n, ends = _crop(L, cfg, rng)
    index, special = assemble([(0, n)], start, ends=ends)
    is_res = index >= 0
    gather = np.where(is_res, index, L + special)
    inputs: Arrays = {}
    targets: Arrays = {}
    loss_masks: Arrays = {}
    for name in CATEGORICAL:
        sp = sizes.specials(name)
        tokens = _gather(arrays[name], gather, _special_rows(sp))
        targets[name] = tokens
        inp = tokens.copy()
        inp[is_res] = sp.mask
        inputs[name] = inp
        loss_masks[name] = is_res.copy() if name == "sequence" else np.zeros(index.size, bool)
    coords = _gather(arrays["coords"], gather, np.nan)
    shown = is_res & _gather(arrays["has_coords"], gather, False)
    inputs["coords"] = _noisy_shown(coords, shown, rng, cfg.coord_noise_sd)
    inputs["chain_id"] = np.zeros(index.size, dtype=np.int64)
    inputs["residue_index"] = index
    inputs |= _plddt_inputs(arrays["plddt"], gather, is_res)
    return inputs, targets, loss_masks


def structure_sample(
    protein: Protein, rng: np.random.Generator, cfg: TaskConfig
) -> tuple[Arrays, Arrays, Arrays]:
    """The structure tokenizer's sample (VQ-VAE training, A.1.7.3): a crop's clean backbone
    (no noise: it is the reconstruction target) and its sequence as the inverse-folding
    target. Same layout as `corrupt` (bos, residues, eos; a longer protein: a window
    without them); the sequence input is all mask, so only its specials say what a position
    is. Raises ValueError when the protein has no coordinates."""
    L, rid = len(protein), protein.id
    if protein.coords is None:
        raise ValueError(f"protein {rid!r}: the structure tokenizer needs coordinates")
    coords, has = validate_coordinates(protein.coords, L, record=rid)
    if not has.any():
        raise ValueError(f"protein {rid!r}: no residue has a complete N/CA/C backbone")
    seq = encode_sequence(protein.sequence, record=rid)
    start, n, ends = _crop(L, cfg, rng)
    index, special = assemble([(0, n)], start, ends=ends)
    is_res = index >= 0
    gather = np.where(is_res, index, L + special)
    sp = cfg.track_sizes().specials("sequence")
    tokens = _gather(seq, gather, _special_rows(sp))
    inputs: Arrays = {
        "sequence": np.where(is_res, sp.mask, tokens),
        "coords": _gather(coords, gather, np.nan),
        "chain_id": np.zeros(index.size, dtype=np.int64),
        "residue_index": index,
    }
    return inputs, {"sequence": tokens}, {"sequence": is_res.copy()}


SampleFn = Callable[[Protein, np.random.Generator, TaskConfig], tuple[Arrays, Arrays, Arrays]]


def task_sample(task: str) -> SampleFn:
    """The sample function of a training task: pretrain, inverse_folding or vqvae."""
    by_task = {"pretrain": corrupt, "inverse_folding": inverse_folding_corrupt,
               "vqvae": structure_sample}  # fmt: skip
    if task not in by_task:
        raise ValueError(f"unknown training task {task!r}; known: {', '.join(by_task)}")
    return by_task[task]
