"""Batches of corrupted samples: length buckets or packed rows, with the padding fraction.

A sample is the (inputs, targets, loss_masks) triple of `corrupt`. A row holds one sample
(bucketed) or several (packed, each with its own `sequence_id`, so attention is
block-diagonal; its chain ids are offset past the row's earlier samples, so geometric
attention, which `esm` confines by chain, never joins two samples). Rows are right-padded
with each track's `<pad>` id, NaN coordinates, esm's default pLDDT (1 and 0), chain and
sequence id -1 to the longest row.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from esm3.tokenize.tracks import CATEGORICAL_TRACKS, TrackSizes

Sample = tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, np.ndarray]]


@dataclass
class Batch:
    """Padded arrays: inputs (model keyword arguments), targets, loss_masks; each (B, T, ...)."""

    inputs: dict[str, np.ndarray]
    targets: dict[str, np.ndarray]
    loss_masks: dict[str, np.ndarray]
    n_tokens: int  # real (non-padding) positions
    padding_fraction: float  # padding positions / (B * T)

    def to_torch(self, device: str = "cpu") -> tuple[dict, dict, dict]:
        import torch

        def conv(d: dict[str, np.ndarray]) -> dict:
            return {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in d.items()}

        return conv(self.inputs), conv(self.targets), conv(self.loss_masks)


def sample_length(sample: Sample) -> int:
    """Positions of a corrupted sample."""
    return int(sample[0]["sequence"].shape[0])


def bucket_rows(lengths: list[int], max_tokens: int) -> list[list[list[int]]]:
    """Length-bucketed batches: samples sorted by length, cut so that rows * longest row
    <= max_tokens. Returns batches of rows of sample indices (one sample per row)."""
    order = np.argsort(lengths, kind="stable")
    batches: list[list[list[int]]] = []
    cur: list[list[int]] = []
    longest = 0
    for i in order.tolist():
        longest_if = max(longest, lengths[i])
        if cur and longest_if * (len(cur) + 1) > max_tokens:
            batches.append(cur)
            cur, longest_if = [], lengths[i]
        cur.append([i])
        longest = longest_if
    if cur:
        batches.append(cur)
    return batches


def pack_rows(lengths: list[int], row_length: int) -> list[list[int]]:
    """First-fit-decreasing packing of samples into rows of at most `row_length` positions.

    Raises ValueError when a sample is longer than a row.
    """
    too_long = [i for i, n in enumerate(lengths) if n > row_length]
    if too_long:
        raise ValueError(
            f"sample {too_long[0]} has {lengths[too_long[0]]} positions, more than a row "
            f"({row_length})"
        )
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, f in enumerate(free):
            if lengths[i] <= f:
                rows[r].append(i)
                free[r] -= lengths[i]
                break
        else:
            rows.append([i])
            free.append(row_length - lengths[i])
    return rows


_FLOAT_FILLS = {"coords": np.nan, "average_plddt": 1.0, "per_res_plddt": 0.0}
_INT_FILLS = {"residue_index": -1, "chain_id": -1}


def _fills(sizes: TrackSizes) -> dict[str, object]:
    return {t: sizes.specials(t).pad for t in CATEGORICAL_TRACKS} | _FLOAT_FILLS | _INT_FILLS


def collate(
    samples: list[Sample],
    rows: list[list[int]] | None = None,
    width: int | None = None,
    *,
    sizes: TrackSizes | None = None,
) -> Batch:
    """Stack samples into a padded batch; `rows` lists the samples of each row (default:
    one per row; a row may be empty: all padding). `width`: pad every row to this many
    positions (a fixed shape; default the longest row). `sizes`: the track sizes the
    samples were tokenized for (their pad ids; default ESM3's). Adds `sequence_id` (B, T)
    and `positions` (B, T) to the inputs."""
    rows = rows if rows is not None else [[i] for i in range(len(samples))]
    row_len = [sum(samples[i][0]["sequence"].shape[0] for i in r) for r in rows]
    B, T = len(rows), max(row_len) if width is None else width
    if T < max(row_len):
        raise ValueError(f"a row has {max(row_len)} positions, more than the width {T}")
    ref_in, ref_tg, ref_lm = samples[next(i for r in rows for i in r)]

    def empty(ref: np.ndarray, fill: object) -> np.ndarray:
        return np.full((B, T) + ref.shape[1:], fill, dtype=ref.dtype)

    fills = _fills(sizes or TrackSizes())
    inputs = {k: empty(v, fills.get(k, 0)) for k, v in ref_in.items()}
    targets = {k: empty(v, fills.get(k, 0)) for k, v in ref_tg.items()}
    masks = {k: empty(v, False) for k, v in ref_lm.items()}
    inputs["sequence_id"] = np.full((B, T), -1, dtype=np.int64)
    inputs["positions"] = np.zeros((B, T), dtype=np.int64)
    for b, r in enumerate(rows):
        pos = chains = 0
        for j, i in enumerate(r):
            s_in, s_tg, s_lm = samples[i]
            n = s_in["sequence"].shape[0]
            sl = slice(pos, pos + n)
            for k, v in s_in.items():
                inputs[k][b, sl] = v
            if "chain_id" in s_in:
                inputs["chain_id"][b, sl] += chains
                chains += int(s_in["chain_id"].max()) + 1
            for k, v in s_tg.items():
                targets[k][b, sl] = v
            for k, v in s_lm.items():
                masks[k][b, sl] = v
            inputs["sequence_id"][b, sl] = j
            inputs["positions"][b, sl] = np.arange(n)
            pos += n
    n_tokens = int(sum(row_len))
    return Batch(inputs, targets, masks, n_tokens, 1.0 - n_tokens / (B * T))
