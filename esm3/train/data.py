"""The training data loader: Parquet shards -> two-level sampling -> corruption -> batches.

Every batch is a pure function of (seed, rank, training step, data index): the sampler's
stream is keyed by (seed, rank) and counted by the data index (`TwoLevelSampler.sample_at`;
for token-counted batches its prefix-stable chunks, token_batches.py), and each sample's
corruption draws from a generator seeded by (seed, data index, rank, sample). So any rank
can build any step's batch in any worker process, a resumed run draws exactly what the
uninterrupted one would, and skipping batches (rollback) is just a larger data index. The
loader's state is (step, data offset).

Records come from each dataset's training store (esm3.data.store), memory-mapped in the
rank and shared by its forked workers: resident memory follows the records touched.
"""

from __future__ import annotations

import itertools
import math
import signal
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import torch

from esm3.data.sampler import ClusterIndex, TwoLevelSampler
from esm3.data.store import Store, StoreError, open_store
from esm3.tasks.batching import Sample, collate, pack_rows, sample_length
from esm3.tasks.corrupt import task_sample
from esm3.tasks.sample import Protein
from esm3.train.config import DatasetSpec, StageConfig, TrainConfig
from esm3.train.faults import inject_faults
from esm3.train.stores import DataError, resolve_paths, store_path
from esm3.train.token_batches import draw_stream, fill_rows, max_draws

__all__ = ["DataError", "Dataset", "load_dataset", "load_datasets", "resolve_paths"]


@dataclass
class Dataset:
    """One dataset: its training store (memory-mapped) and the sampling index over it.

    clusters: the index's centers (offsets only); member_rows: int64 (M,), the record row of
    each member. Both are the store's mapped arrays unless the run keeps a subset
    (data.max_records, or inverse folding's structures with coordinates).
    """

    name: str
    type: str
    store: Store
    clusters: ClusterIndex
    member_rows: np.ndarray
    dropped_members: int = 0  # cluster members without a record (e.g. purged)
    # record rows held out for validation (`validation.holdout`), never among member_rows
    held_out: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def protein(self, row: int) -> Protein:
        rec = self.store.record(row)
        rec["dataset"] = self.name
        return Protein.from_record(rec)

    def generated(self, row: int) -> list[str]:
        """Sequences generated for the structure of record `row` (inverse folding)."""
        return self.store.generated(row)

    def __len__(self) -> int:
        return len(self.store)


def subset_index(
    offsets: np.ndarray, member_rows: np.ndarray, keep_row: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The index without members whose row fails `keep_row` (bool per record row); centers
    left empty go too. In memory: for small runs and the structure subset of inverse folding."""
    keep = keep_row[member_rows]
    counts = np.add.reduceat(keep.astype(np.int64), np.asarray(offsets[:-1]))
    counts[np.diff(offsets) == 0] = 0
    counts = counts[counts > 0]
    return np.concatenate(([0], np.cumsum(counts))).astype(np.int64), np.asarray(member_rows)[keep]


def _rows_with_coords(store: Store) -> np.ndarray:
    return np.concatenate(
        [c.is_valid().to_numpy(zero_copy_only=False) for c in store.column("coords")]
    )


def load_dataset(
    spec: DatasetSpec, root: str | Path, *, max_records: int = 0, need_coords: bool = False
) -> Dataset:
    """Open one dataset's store (writing an ad-hoc one first; see esm3.train.stores).

    max_records keeps the first N records; need_coords keeps only records with coordinates
    (inverse folding); centers left without members go with them.
    """
    return open_dataset(spec.name, store_path(spec, root), max_records=max_records,
                        need_coords=need_coords)  # fmt: skip


def open_dataset(
    name: str,
    path: str | Path,
    *,
    max_records: int = 0,
    need_coords: bool = False,
    hold_out: Callable[[int], np.ndarray] | None = None,
) -> Dataset:
    """The Dataset of the store at `path` (see load_dataset); `hold_out(n_records)`: the
    record rows held out for validation, never drawn (kept as `Dataset.held_out`)."""
    try:
        store = open_store(path)
    except StoreError as e:
        raise DataError(f"dataset {name!r}: {e}") from e
    offsets, rows = store.center_offsets, store.member_rows
    keep = None
    if max_records and max_records < len(store):
        keep = np.arange(len(store)) < max_records
    if need_coords and store.meta["rows_without_coords"]:
        if "coords" not in store.meta["columns"]:
            raise DataError(f"dataset {name!r}: no 'coords' column ({path})")
        has = _rows_with_coords(store)
        keep = has if keep is None else keep & has
    held = hold_out(len(store)) if hold_out else np.zeros(0, np.int64)
    if len(held):
        keep = np.ones(len(store), bool) if keep is None else keep
        keep[held] = False
    if keep is not None:
        offsets, rows = subset_index(offsets, rows, keep)
        if len(rows) == 0:
            what = "record has coordinates" if need_coords else "cluster member is kept"
            raise DataError(f"dataset {name!r}: no {what} ({path})")
    return Dataset(
        name,
        store.type,
        store,
        ClusterIndex(None, None, offsets),
        rows,
        int(store.meta["dropped_members"]),
        held,
    )


def load_datasets(cfg: TrainConfig, root: str | Path) -> dict[str, Dataset]:
    """Every training dataset, without the records held out for validation."""
    need = cfg.data.task in ("inverse_folding", "vqvae")
    out = {}
    for d in cfg.data.datasets:
        hold = partial(_holdout, cfg, d.name) if d.name in cfg.validation.holdout else None
        out[d.name] = open_dataset(d.name, store_path(d, root), max_records=cfg.data.max_records,
                                   need_coords=need, hold_out=hold)  # fmt: skip
    if cfg.data.task == "pretrain":  # the others train on coordinates, not on tokens
        check_structure_tokenizers(out, cfg.tasks.codebook_size)
    return out


def check_structure_tokenizers(datasets: dict[str, Dataset], codebook_size: int) -> None:
    """The structure datasets' tokens all come from one tokenizer, of the model's codebook
    size; DataError naming the datasets otherwise (a store that records none is older than
    the record: its tokens are k-means ones)."""
    made = {n: d.store.meta.get("structure_tokenizer") for n, d in datasets.items()
            if d.type == "structure"}  # fmt: skip
    known = {n: t for n, t in made.items() if t}
    if len({(t["kind"], t["digest"]) for t in known.values()}) > 1:
        said = "; ".join(f"{n}: {t['kind']} {t['digest']}" for n, t in sorted(known.items()))
        raise DataError(f"structure datasets tokenized by different structure tokenizers ({said}): "
                        "run the tokens stage of every dataset with one tokenizer")  # fmt: skip
    if known and any(not t for t in made.values()) and any(t["kind"] == "vqvae" for t in known.values()):
        old = sorted(n for n, t in made.items() if not t)
        raise DataError(f"dataset(s) {old} were tokenized before stores recorded their tokenizer "
                        "(k-means) and the others by a VQ-VAE: tokenize them again")  # fmt: skip
    for n, t in sorted(known.items()):
        if t["codebook_size"] != codebook_size:
            raise DataError(f"dataset {n!r}: its structure tokens come from a {t['kind']} "
                            f"tokenizer of {t['codebook_size']} codes, but tasks.codebook_size "
                            f"is {codebook_size}")  # fmt: skip


def _holdout(cfg: TrainConfig, dataset: str, n_records: int) -> np.ndarray:
    if n_records <= cfg.validation.rows:
        raise DataError(f"dataset {dataset!r}: validation.holdout would take all its "
                        f"{n_records} records (validation.rows {cfg.validation.rows}); lower "
                        "validation.rows")  # fmt: skip
    return held_out_rows(cfg, dataset, n_records)


def held_out_rows(cfg: TrainConfig, dataset: str, n_records: int) -> np.ndarray:
    """The record rows of `dataset` held out for validation (`validation.holdout`): the
    `validation.rows` rows with the smallest hash of (seed, dataset, row), ascending.
    Computed in chunks, so memory follows the rows kept, not the store's size."""
    v = cfg.validation
    salt = np.uint64(zlib.crc32(f"{v.seed}:{dataset}".encode()))
    best = np.zeros(0, np.int64)
    chunk = 1 << 22
    for lo in range(0, n_records, chunk):
        rows = np.concatenate([best, np.arange(lo, min(lo + chunk, n_records), dtype=np.int64)])
        keys = _mix(rows.astype(np.uint64) ^ salt)
        best = rows[np.argsort(keys, kind="stable")[: v.rows]]
    return np.sort(best)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a fixed, well-spread hash of uint64 values."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def mixing_weights(cfg: TrainConfig, stage: StageConfig) -> dict[str, float]:
    """Per-dataset weights of a stage: each type's share (sequence vs structure) split among
    its datasets by their own weights; normalized to sum 1."""
    w = {d.name: stage.weights.get(d.name, d.weight) for d in cfg.data.datasets}
    share = {
        "sequence": cfg.data.sequence_weight
        if stage.sequence_weight is None
        else stage.sequence_weight,
        "structure": cfg.data.structure_weight
        if stage.structure_weight is None
        else stage.structure_weight,
    }
    out: dict[str, float] = {}
    for typ in ("sequence", "structure"):
        names = [d.name for d in cfg.data.datasets if d.type == typ]
        tot = sum(w[n] for n in names)
        for n in names:
            out[n] = share[typ] * w[n] / tot if tot > 0 else 0.0
    total = sum(out.values())
    if total <= 0:
        raise DataError(f"stage {stage.name!r}: every dataset has weight 0")
    return {n: v / total for n, v in out.items()}


def drop_tracks(p: Protein, tracks: list[str]) -> Protein:
    """The protein with the tracks a stage has switched off removed (all MASK, no loss)."""
    on = set(tracks)
    return replace(
        p,
        structure_tokens=p.structure_tokens if "structure" in on else None,
        coords=p.coords if "coords" in on else None,
        plddt=p.plddt if "coords" in on else None,
        ss8=p.ss8 if "ss8" in on else None,
        sasa=p.sasa if "sasa" in on else None,
        function=p.function if "function" in on else [],
        residue_annotations=p.residue_annotations if "residue" in on else [],
    )


@dataclass
class TrainBatch:
    """One rank's batch of one step: model inputs, targets and loss masks as torch tensors."""

    step: int
    data_step: int
    stage: int
    inputs: dict[str, torch.Tensor]
    targets: dict[str, torch.Tensor]
    loss_masks: dict[str, torch.Tensor]
    n_tokens: int  # real positions (all samples)
    tokens_by_dataset: dict[str, int]
    padding_fraction: float
    fault: str = ""  # "nan" | "spike": a planted fault (stability drills, see faults.py)
    bad_records: list[str] = field(default_factory=list)
    build_s: float = 0.0


class BatchBuilder:
    """Builds the batch of (step, data index) for one rank. Picklable; used in workers.

    per_rank: this rank's share of a step (`TrainConfig.check_world_size`): samples with
    data.batch_size, positions with data.batch_tokens (rows of the stage's context length,
    packed; see token_batches.py).
    """

    def __init__(
        self, cfg: TrainConfig, datasets: dict[str, Dataset], *, rank: int, per_rank: int
    ) -> None:
        self.cfg = cfg
        self.datasets = datasets
        self.rank = rank
        self.per_rank = per_rank
        self.names = [d.name for d in cfg.data.datasets]
        self._samplers: dict[int, TwoLevelSampler] = {}
        self._tasks: dict[int, Any] = {}

    def sampler(self, stage: int) -> TwoLevelSampler:
        if stage not in self._samplers:
            w = mixing_weights(self.cfg, self.cfg.stages[stage])
            self._samplers[stage] = TwoLevelSampler(
                {n: self.datasets[n].clusters for n in self.names},
                w,
                seed=self.cfg.seed,
                rank=self.rank,
            )
        return self._samplers[stage]

    def task_config(self, stage: int) -> Any:
        if stage not in self._tasks:
            ctx = self.cfg.stages[stage].context_length
            self._tasks[stage] = replace(self.cfg.tasks, max_length=ctx)
        return self._tasks[stage]

    def _drawn(
        self, stage: int, data_step: int, i: int, dataset: int, member: int
    ) -> tuple[str, Protein, np.random.Generator]:
        """Draw i of a data index as (dataset, protein, rng), after the 50/50 rule; the rng
        (seeded by seed, data index, rank, draw) goes on to corrupt the sample."""
        ds = self.datasets[self.names[dataset]]
        row = int(ds.member_rows[member])
        rng = np.random.default_rng([self.cfg.seed, data_step, self.rank, i])
        p = ds.protein(row)
        gen = ds.generated(row)
        if gen and rng.random() < self.cfg.data.inverse_folding_prob:
            seq = gen[int(rng.integers(len(gen)))]
            if len(seq) == len(p):
                p = replace(p, sequence=seq)
        return ds.name, drop_tracks(p, self.cfg.stages[stage].tracks), rng

    def proteins(
        self, stage: int, data_step: int
    ) -> list[tuple[str, Protein, np.random.Generator]]:
        """The per_rank (dataset, protein, rng) triples of a data index (data.batch_size)."""
        draws = self.sampler(stage).sample_at(data_step, self.per_rank)
        return [
            self._drawn(stage, data_step, i, int(draws.dataset[i]), int(draws.member[i]))
            for i in range(self.per_rank)
        ]

    def _corrupted(
        self, stage: int, drawn: Iterable[tuple[str, Protein, np.random.Generator]], bad: list[str]
    ) -> Iterator[tuple[str, Sample]]:
        """(dataset, sample) of each drawn protein; a record the tokenizers refuse is
        counted in `bad` and skipped, not fatal."""
        tcfg = self.task_config(stage)
        fn = task_sample(self.cfg.data.task)
        for name, p, rng in drawn:
            try:
                yield name, fn(p, rng, tcfg)
            except ValueError as e:
                bad.append(f"{name}:{p.id}: {e}")

    def _sample_rows(
        self, stage: int, data_step: int, bad: list[str]
    ) -> tuple[list[tuple[str, Sample]], list[list[int]] | None, int | None]:
        """data.batch_size: per_rank samples, one per row or packed (data.pack)."""
        samples = list(self._corrupted(stage, self.proteins(stage, data_step), bad))
        rows = None
        if self.cfg.data.pack and samples:
            ctx = self.cfg.stages[stage].context_length
            rows = pack_rows([sample_length(s) for _, s in samples], ctx)
        return samples, rows, None

    def _token_rows(
        self, stage: int, data_step: int, bad: list[str]
    ) -> tuple[list[tuple[str, Sample]], list[list[int]], int]:
        """data.batch_tokens: per_rank positions as rows of the context length, packed from
        the prefix-stable stream of draws (token_batches.py)."""
        ctx = self.cfg.stages[stage].context_length
        rows = self.per_rank // ctx
        stream = itertools.islice(draw_stream(self.sampler(stage), data_step), max_draws(rows, ctx))
        drawn = (self._drawn(stage, data_step, i, d, m) for i, (d, m) in enumerate(stream))
        samples: list[tuple[str, Sample]] = []

        def lengths() -> Iterator[int]:
            for named in self._corrupted(stage, drawn, bad):
                samples.append(named)
                yield sample_length(named[1])

        return samples, fill_rows(lengths(), rows, ctx), ctx

    def build(self, step: int, data_step: int) -> TrainBatch:
        import time

        t0 = time.perf_counter()
        stage, _ = self.cfg.stage_at(step)
        bad: list[str] = []
        by_tokens = self.cfg.data.batch_tokens > 0
        make = self._token_rows if by_tokens else self._sample_rows
        named, rows, width = make(stage, data_step, bad)
        used = sorted(i for r in rows for i in r) if rows is not None else range(len(named))
        if not used:
            raise DataError(f"step {step}: every sample of the batch was refused: {bad[:3]}")
        by_ds = dict.fromkeys(self.names, 0)
        for i in used:
            by_ds[named[i][0]] += sample_length(named[i][1])
        sizes = self.task_config(stage).track_sizes()
        b = collate([s for _, s in named], rows, width, sizes=sizes)
        inputs, targets, masks = b.to_torch()
        return TrainBatch(
            step,
            data_step,
            stage,
            inputs,
            targets,
            masks,
            b.n_tokens,
            by_ds,
            b.padding_fraction,
            "",
            bad,
            time.perf_counter() - t0,
        )


class _StepDataset(torch.utils.data.Dataset):
    def __init__(self, builder: BatchBuilder) -> None:
        self.builder = builder

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, key: tuple[int, int]) -> TrainBatch:
        return self.builder.build(*key)


def _identity(x: Any) -> Any:
    return x


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # a worker builds numpy batches; leave the cores to training
    # the scheduler's SIGTERM goes to every process of the job: the main process decides
    # how to stop, and a worker dying first would surface as a DataLoader error instead;
    # a worker still ends with its parent
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def batches(
    builder: BatchBuilder,
    start_step: int,
    end_step: int,
    data_offset: int,
    *,
    workers: int = 0,
    prefetch: int = 2,
) -> Iterator[TrainBatch]:
    """Batches of steps [start_step, end_step) with data index step + data_offset, in order.

    With workers > 0, worker processes build them ahead (`prefetch` each), so the training
    step does not wait on data.
    """
    keys = [(s, s + data_offset) for s in range(start_step, end_step)]
    if workers <= 0:
        return (builder.build(*k) for k in keys)
    loader = torch.utils.data.DataLoader(
        _StepDataset(builder),
        sampler=keys,
        batch_size=None,
        collate_fn=_identity,
        num_workers=workers,
        prefetch_factor=max(1, prefetch),
        worker_init_fn=_worker_init,
        multiprocessing_context="fork",
    )
    return iter(loader)


class BatchSource:
    """The batches of a run from any (step, data offset): the loader, with planted faults
    tagged (`faults.inject_faults`). A rollback simply asks for a new iterator."""

    def __init__(self, builder: BatchBuilder) -> None:
        self.builder = builder
        self.cfg = builder.cfg

    def iterate(self, start_step: int, end_step: int, data_offset: int) -> Iterator[TrainBatch]:
        it = batches(
            self.builder,
            start_step,
            end_step,
            data_offset,
            workers=self.cfg.data.workers,
            prefetch=self.cfg.data.prefetch,
        )
        return inject_faults(it, self.cfg.stability)

    def loader_state(self, stage: int) -> dict[str, Any]:
        """This rank's sampler state in a stage (recorded in checkpoints)."""
        return self.builder.sampler(stage).state_dict()

    def stage_weights(self, stage: int) -> list[float]:
        return self.builder.sampler(stage).weights.tolist()


def estimate_tokens(datasets: dict[str, Dataset]) -> dict[str, float]:
    """Mean sample length (residues + 2) per dataset, for planning (reads every sequence)."""
    out = {}
    for n, d in datasets.items():
        total = sum(pc.sum(pc.utf8_length(c)).as_py() or 0 for c in d.store.column("sequence"))
        out[n] = total / len(d) + 2 if len(d) else math.nan
    return out
