"""Validation loss during training (paper A.2.1's validation sets, as the purge wrote them).

- Subset: per dataset, the `rows` ids with the smallest 64-bit hash of "<seed>:<id>" (ties
  by id), so the subset does not depend on file order or sharding. Choosing reads only the
  `id` and `dataset` columns; then only the chosen rows' record columns are kept.
- Sharding: rank r evaluates subset positions r, r + world, ... of every dataset (disjoint,
  together the whole subset).
- Corruption: protein i of dataset d is corrupted as in training (the stage's context
  length and tracks) by a generator seeded with (seed, crc32(d), i): the same weights give
  the same numbers, on any number of ranks, and no training generator is touched.
- Reduction: per dataset and track the loss sum and positions are summed over the ranks
  (float64), so every rank returns the same `ValidationResult`.

Under FSDP every rank must run the same forward passes: each runs ceil(ceil(n / world) /
batch_size) batches per dataset, and a rank whose batch came out empty forwards a
placeholder protein whose loss is discarded.
"""

from __future__ import annotations

import hashlib
import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

from esm3.data.store import COLUMNS
from esm3.tasks.batching import Sample, collate, pack_rows
from esm3.tasks.corrupt import task_sample
from esm3.tasks.sample import Protein
from esm3.train.config import StageConfig, TrainConfig, ValidationConfig
from esm3.train.data import DataError, drop_tracks, resolve_paths
from esm3.train.loss import LossFn
from esm3.train.stats import all_reduce

__all__ = [
    "Evaluator",
    "ValidationConfig",
    "ValidationResult",
    "choose_subset",
    "load_validation",
    "shard",
    "validation_files",
]

#: dataset -> its chosen records, in subset order
ValidationSet = dict[str, pa.Table]


# --- the subset ----------------------------------------------------------------------------


def subset_keys(ids: Sequence[str], seed: int) -> np.ndarray:
    """uint64 hash of "<seed>:<id>" per id: the order in which a dataset's ids are chosen."""
    salt = f"{int(seed)}:".encode()
    return np.array(
        [
            int.from_bytes(hashlib.blake2b(salt + i.encode(), digest_size=8).digest(), "little")
            for i in ids
        ],
        dtype=np.uint64,
    )


def choose_subset(
    ids: Sequence[str], datasets: Sequence[str], rows: int, seed: int
) -> dict[str, np.ndarray]:
    """Per dataset (sorted names), the positions in `ids` of its first `rows` ids by
    `subset_keys` (ties by id), in that order."""
    ids_a = np.asarray(ids, dtype=object)
    ds_a = np.asarray(datasets, dtype=object)
    keys = subset_keys(ids, seed)
    out: dict[str, np.ndarray] = {}
    for name in sorted(set(datasets)):
        pos = np.flatnonzero(ds_a == name)
        order = np.lexsort((ids_a[pos].astype(str), keys[pos]))
        out[name] = pos[order[:rows]]
    return out


def shard(n: int, rank: int, world: int) -> range:
    """The subset positions rank `rank` of `world` evaluates: disjoint, together 0..n-1."""
    return range(rank, n, world)


def validation_files(
    cfg: ValidationConfig, root: str | Path, *, read_schemas: bool = True
) -> list[Path]:
    """The validation files (globs resolved under `root`); DataError naming a file that
    matches nothing or (unless not `read_schemas`: a dry run opens no data file) lacks the
    id, dataset or sequence column."""
    files = resolve_paths(cfg.files, root, "validation set")
    for f in files if read_schemas else []:
        try:
            names = pq.read_schema(f).names
        except Exception as e:  # noqa: BLE001 - pyarrow's many error types
            raise DataError(f"validation set: {f} is not a readable Parquet file ({e})") from e
        missing = [c for c in ("id", "dataset", "sequence") if c not in names]
        if missing:
            raise DataError(f"validation set: {f} has no column(s) {missing}")
    return files


def load_validation(cfg: ValidationConfig, root: str | Path) -> ValidationSet:
    """The chosen records of every dataset in the validation files (see `choose_subset`)."""
    files = validation_files(cfg, root)
    keys = [pq.read_table(f, columns=["id", "dataset"]) for f in files]
    sizes = np.cumsum([0] + [t.num_rows for t in keys])
    both = pa.concat_tables(keys)
    chosen = choose_subset(
        both.column("id").to_pylist(), both.column("dataset").to_pylist(), cfg.rows, cfg.seed
    )
    wanted = np.sort(np.concatenate([np.zeros(0, np.int64), *chosen.values()]))
    parts = []
    for i, f in enumerate(files):
        local = wanted[(wanted >= sizes[i]) & (wanted < sizes[i + 1])] - sizes[i]
        if len(local):
            cols = [c for c in ("dataset", *COLUMNS) if c in pq.read_schema(f).names]
            parts.append(pq.read_table(f, columns=cols).take(local))
    if not parts:
        raise DataError(f"validation set: no record in {files[0]} ...")
    picked = pa.concat_tables(parts, promote_options="permissive")  # rows in `wanted` order
    return {n: picked.take(np.searchsorted(wanted, pos)) for n, pos in chosen.items()}


def load_holdout(cfg: TrainConfig, datasets: dict[str, Any]) -> ValidationSet:
    """The records each `validation.holdout` dataset gave up (`Dataset.held_out`), read
    from its training store."""
    return {n: datasets[n].store.take(datasets[n].held_out) for n in cfg.validation.holdout}


def load_all(cfg: TrainConfig, root: str | Path, datasets: dict[str, Any]) -> ValidationSet:
    """The run's validation records: the validation files' and the held-out ones."""
    got = load_validation(cfg.validation, root) if cfg.validation.files else {}
    return {**got, **load_holdout(cfg, datasets)}


# --- the result ----------------------------------------------------------------------------


@dataclass
class ValidationResult:
    """The world's validation losses at one step.

    loss_sum[d][t]: per-position loss of track t summed over dataset d's subset (per-batch
    mean x positions), positions[d][t] its positions; a dataset's loss is the training
    combination sum_t weight_t x mean_t; `loss` is the mean of the datasets' losses (each
    dataset counts the same, as the paper reports them one by one).
    """

    step: int
    stage: str
    weights: dict[str, float]
    loss_sum: dict[str, dict[str, float]]
    positions: dict[str, dict[str, int]]
    proteins: dict[str, int] = field(default_factory=dict)
    refused: dict[str, int] = field(default_factory=dict)

    def track_loss(self, dataset: str, track: str) -> float | None:
        n = self.positions[dataset].get(track, 0)
        return self.loss_sum[dataset][track] / n if n else None

    def dataset_loss(self, dataset: str) -> float | None:
        means = {t: self.track_loss(dataset, t) for t in self.positions[dataset]}
        parts = [self.weights.get(t, 0.0) * m for t, m in means.items() if m is not None]
        return float(sum(parts)) if parts else None

    @property
    def loss(self) -> float:
        losses = [v for d in self.loss_sum if (v := self.dataset_loss(d)) is not None]
        return float(np.mean(losses)) if losses else math.nan

    def mean_track_loss(self, track: str) -> float | None:
        """The track's loss averaged over the datasets that have positions for it."""
        got = [v for d in self.loss_sum if (v := self.track_loss(d, track)) is not None]
        return float(np.mean(got)) if got else None

    def rows(self) -> list[dict[str, Any]]:
        """(dataset, track, loss, tokens) per dataset and loss column ('loss': the total,
        its tokens the positions of every track in it), as the `validation` view reads them."""
        out = []
        for d in self.loss_sum:
            total = self.dataset_loss(d)
            if total is not None:
                n = sum(self.positions[d].values())
                out.append(dict(dataset=d, track="loss", loss=total, tokens=n))
            for t, n in self.positions[d].items():
                if n:
                    out.append(
                        dict(dataset=d, track=self.label(t), loss=self.track_loss(d, t), tokens=n)
                    )
        return out

    def detail(self) -> dict[str, Any]:
        """The event's detail: per-track losses under the train_steps column names (mean over
        datasets), and per-dataset per-track losses with their positions."""
        tracks = {t for d in self.positions for t, n in self.positions[d].items() if n}
        per_track = {self.label(t): self.mean_track_loss(t) for t in sorted(tracks)}
        return dict(
            stage=self.stage,
            **per_track,
            per_dataset=self.rows(),
            proteins=dict(self.proteins),
            refused=dict(self.refused),
        )

    def label(self, track: str) -> str:
        """A loss track under its train_steps column name; a measurement under its own."""
        return f"loss_{track}" if track in self.weights else track

    def measurements(self) -> dict[str, float]:
        """Reported values that are not losses (mean over datasets), e.g. the tokenizer's
        backbone RMSD and lDDT."""
        names = {t for d in self.positions for t, n in self.positions[d].items() if n}
        return {t: v for t in sorted(names - set(self.weights))
                if (v := self.mean_track_loss(t)) is not None}  # fmt: skip

    def message(self) -> str:
        each = ", ".join(
            f"{d} {v:.4f}" for d in self.loss_sum if (v := self.dataset_loss(d)) is not None
        )
        extra = "".join(f"; {t} {v:.4g}" for t, v in self.measurements().items())
        return f"validation loss {self.loss:.4f} ({each}){extra}"


# --- the evaluator -------------------------------------------------------------------------


@dataclass
class _EvalBatch:
    """What a loss function reads of a batch (as TrainBatch has it)."""

    inputs: dict[str, torch.Tensor]
    targets: dict[str, torch.Tensor]
    loss_masks: dict[str, torch.Tensor]
    fault: str = ""


class Evaluator:
    """Evaluates the validation subset every `validation.every` steps (and at the last).

    Every rank constructs one with the same records; `evaluate` is collective."""

    def __init__(
        self,
        cfg: TrainConfig,
        records: ValidationSet,
        loss_fn: LossFn,
        device: torch.device,
        *,
        tracks: Sequence[str],
        weights: dict[str, float] | None = None,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        self.cfg = cfg
        # the losses' weights (default: ESM3's per-track weights); a reported value without
        # one (the tokenizer's RMSD, lDDT) is a measurement, not part of the loss
        self.weights = dict(cfg.loss_weights if weights is None else weights)
        self.vcfg = cfg.validation
        self.records = {n: records[n] for n in sorted(records)}
        self.loss_fn = loss_fn
        self.device = device
        self.tracks = list(tracks)
        self.rank, self.world = rank, world
        self._placeholders: dict[tuple[str, int], Sample | None] = {}

    def due(self, step: int, end: int) -> bool:
        """After step `step` (1-based) of a run that ends at `end`."""
        every = self.vcfg.every
        return every > 0 and step > 0 and (step % every == 0 or step == end)

    def rank_ids(self, dataset: str) -> list[str]:
        """The ids of `dataset` this rank evaluates."""
        t = self.records[dataset]
        return t.column("id").take(list(shard(t.num_rows, self.rank, self.world))).to_pylist()

    def evaluate(self, model: nn.Module, step: int) -> ValidationResult:
        """The validation losses of `model` after step `step`, with that step's stage (in
        eval mode without gradients; the model's mode is restored)."""
        index, stage = self.cfg.stage_at(max(step - 1, 0))
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                local = [self._dataset_sums(model, name, index, stage) for name in self.records]
        finally:
            model.train(was_training)
        world = all_reduce(torch.tensor(np.concatenate(local), dtype=torch.float64))
        return self._result(step, stage.name, world.numpy())

    def _dataset_sums(
        self, model: nn.Module, name: str, index: int, stage: StageConfig
    ) -> np.ndarray:
        """[loss sum, positions] per track, then [proteins, refused]: this rank's part."""
        table = self.records[name]
        mine = shard(table.num_rows, self.rank, self.world)
        bs = self.vcfg.batch_size
        n_batches = math.ceil(math.ceil(table.num_rows / self.world) / bs)
        out = np.zeros(2 * len(self.tracks) + 2)
        for b in range(n_batches):
            samples, refused = self._samples(name, mine[b * bs : (b + 1) * bs], stage)
            out[-1] += refused
            if samples:
                self._add_losses(out, self._forward(model, samples, stage))
                out[-2] += len(samples)
            elif (filler := self._placeholder(name, index, stage)) is not None:
                self._forward(model, [filler], stage)  # the collectives of FSDP; loss discarded
        return out

    def _add_losses(self, out: np.ndarray, loss: Any) -> None:
        for i, t in enumerate(self.tracks):
            n = loss.counts.get(t, 0)
            if t in loss.per_track and n:
                out[2 * i] += float(loss.per_track[t]) * n
                out[2 * i + 1] += n

    def _forward(self, model: nn.Module, samples: list[Sample], stage: StageConfig) -> Any:
        rows = None
        if self.cfg.data.pack:
            rows = pack_rows([s[0]["sequence"].shape[0] for s in samples], stage.context_length)
        sizes = self.cfg.tasks.track_sizes()
        inputs, targets, masks = collate(samples, rows, sizes=sizes).to_torch()

        def move(d: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {k: v.to(self.device, non_blocking=True) for k, v in d.items()}

        batch = _EvalBatch(move(inputs), move(targets), move(masks))
        return self.loss_fn(model(**batch.inputs), batch)

    def _samples(self, name: str, positions: range, stage: StageConfig) -> tuple[list[Sample], int]:
        """The corrupted samples of subset positions; records the tokenizers refuse are
        counted, not fatal (as in training)."""
        table = self.records[name]
        recs = table.take(list(positions)).to_pylist() if len(positions) else []
        out = [
            s
            for i, rec in zip(positions, recs, strict=True)
            if (s := self._sample(name, i, rec, stage)) is not None
        ]
        return out, len(recs) - len(out)

    def _sample(self, name: str, i: int, rec: dict[str, Any], stage: StageConfig) -> Sample | None:
        rng = np.random.default_rng([self.vcfg.seed, zlib.crc32(name.encode()), i])
        fn = task_sample(self.cfg.data.task)
        tcfg = replace(self.cfg.tasks, max_length=stage.context_length)
        try:
            p = Protein.from_record({**rec, "dataset": name})
            return fn(drop_tracks(p, stage.tracks), rng, tcfg)
        except ValueError:
            return None

    def _placeholder(self, name: str, index: int, stage: StageConfig) -> Sample | None:
        """The dataset's first usable sample (the same on every rank; None when no record of
        the dataset is usable, and then no rank has a batch of it)."""
        key = (name, index)
        if key not in self._placeholders:
            table = self.records[name]
            found = None
            for i in range(table.num_rows):
                found = self._sample(name, i, table.slice(i, 1).to_pylist()[0], stage)
                if found is not None:
                    break
            self._placeholders[key] = found
        return self._placeholders[key]

    def _result(self, step: int, stage: str, vec: np.ndarray) -> ValidationResult:
        width = 2 * len(self.tracks) + 2
        res = ValidationResult(step, stage, dict(self.weights), {}, {})
        for j, name in enumerate(self.records):
            part = vec[j * width : (j + 1) * width]
            res.loss_sum[name] = {t: float(part[2 * i]) for i, t in enumerate(self.tracks)}
            res.positions[name] = {t: int(part[2 * i + 1]) for i, t in enumerate(self.tracks)}
            res.proteins[name] = int(part[-2])
            res.refused[name] = int(part[-1])
        return res
