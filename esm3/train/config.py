"""The training config: one small dataclass per component, loaded from TOML.

Every field has the paper's default where the paper gives one (AdamW 0.9/0.95, weight decay
0.01, clipping 1.0, cosine to 10% of the peak). `validate()` raises `TrainConfigError`
(a ValueError with one line naming the key); the loader in `jobs/` turns it into the
suite's ConfigError.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from esm3.model.config import PRESETS, BackendConfig, ModelConfig, preset
from esm3.model.vqvae.config import PRESETS as VQVAE_PRESETS
from esm3.model.vqvae.config import VQVAEConfig, vqvae_config
from esm3.tasks.config import TaskConfig
from esm3.tokenize.tracks import CATEGORICAL_TRACKS, TrackSizes

#: Tracks a stage can switch on or off ("coords" is the backbone-coordinate input).
TRACKS = ("sequence", "structure", "coords", "ss8", "sasa", "function", "residue")


class TrainConfigError(ValueError):
    """A bad training config; the message is one line naming the key."""


def _bad(key: str, msg: str) -> TrainConfigError:
    return TrainConfigError(f"config key '{key}': {msg}")


def _finite(key: str, value: float) -> None:
    # NaN fails every comparison and inf passes a lower bound: refuse both by name
    if not math.isfinite(value):
        raise _bad(key, f"must be a finite number, got {value}")


def _at_least(key: str, value: float, low: float) -> None:
    _finite(key, value)
    if value < low:
        raise _bad(key, f"must be >= {low}, got {value}")


def _above(key: str, value: float, low: float) -> None:
    _finite(key, value)
    if value <= low:
        raise _bad(key, f"must be > {low}, got {value}")


def _in_range(key: str, value: float, low: float, high: float, high_open: bool = False) -> None:
    _finite(key, value)
    if value < low or value > high or (high_open and value == high):
        raise _bad(key, f"must be in [{low}, {high}{')' if high_open else ']'}, got {value}")


@dataclass
class ModelSection:
    """A preset of `esm3.model.config.PRESETS`, with optional size overrides; or a VQ-VAE
    preset of `esm3.model.vqvae.config.PRESETS` (the structure tokenizer), whose shapes
    `encoder` / `decoder` override and whose losses `loss_weights` weigh."""

    preset: str = "tiny"
    d_model: int | None = None
    n_layers: int | None = None
    d_head: int | None = None
    context_length: int | None = None
    geom_heads: int | None = None  # geometric attention heads (esm's "v_heads")
    ffn_multiple: int | None = None  # SwiGLU width rounded up to this (esm: 256)
    attention: Literal["sdpa", "xformers"] = "sdpa"
    linear: Literal["torch", "te"] = "torch"
    # VQ-VAE presets only
    encoder: dict[str, bool | int | float] = field(default_factory=dict)
    decoder: dict[str, bool | int | float] = field(default_factory=dict)
    loss_weights: dict[str, float] = field(default_factory=dict)
    # stage 2: the stage-1 checkpoint whose encoder and codebook it freezes
    stage1_checkpoint: str = ""

    @property
    def is_vqvae(self) -> bool:
        return self.preset in VQVAE_PRESETS

    def build_vqvae(self) -> VQVAEConfig:
        """The VQ-VAE preset with the section's overrides."""
        base = VQVAE_PRESETS[self.preset]
        unknown = set(self.loss_weights) - set(base.loss_weights)
        if unknown:
            raise _bad("model.loss_weights", f"unknown losses {sorted(unknown)}; known: "
                       f"{', '.join(base.loss_weights)}")  # fmt: skip
        over: dict[str, object] = {"encoder": dict(self.encoder), "decoder": dict(self.decoder),
                                   "loss_weights": {**base.loss_weights, **self.loss_weights}}  # fmt: skip
        if self.context_length is not None:
            over["context_length"] = self.context_length
        try:
            return vqvae_config(self.preset, **over)
        except (ValueError, TypeError) as e:
            raise TrainConfigError(f"config key 'model': {e}") from e

    def check(self) -> None:
        """The size overrides in range (before the model config divides by them)."""
        for k in ("d_model", "n_layers", "d_head", "geom_heads", "ffn_multiple"):
            if getattr(self, k) is not None:
                _at_least(f"model.{k}", getattr(self, k), 1)
        if self.context_length is not None:
            _at_least("model.context_length", self.context_length, 3)

    def build(self, fp8: bool = False, tracks: TrackSizes | None = None) -> ModelConfig:
        """The preset with the overrides; `tracks` (the tokenizer's sizes) replaces the
        preset's vocabulary sizes."""
        over: dict[str, object] = {
            k: getattr(self, k)
            for k in (
                "d_model",
                "n_layers",
                "d_head",
                "context_length",
                "geom_heads",
                "ffn_multiple",
            )
            if getattr(self, k) is not None
        }
        over["backend"] = BackendConfig(attention=self.attention, linear=self.linear, fp8=fp8)
        if tracks is not None:
            over["tracks"] = tracks
        try:
            return preset(self.preset, **over)
        except (ValueError, TypeError) as e:
            raise TrainConfigError(f"config key 'model': {e}") from e


@dataclass
class DatasetSpec:
    """One training dataset: a preprocessing store, or Parquet shards of records.

    source: "<preprocess config>:<dataset>", the training store that preprocessing wrote
    (found through its manifest). Otherwise shards / clusters (paths or globs; relative ones
    under the workspace's `data/` folder), converted into a store on first use. clusters:
    Parquet (center, member); empty: every record is its own cluster. inverse_folded:
    Parquet (id, sequence) of sequences generated for this dataset's structures.
    """

    name: str = ""
    type: Literal["sequence", "structure"] = "sequence"
    source: str = ""
    shards: list[str] = field(default_factory=list)
    clusters: list[str] = field(default_factory=list)
    weight: float = 1.0
    inverse_folded: list[str] = field(default_factory=list)


@dataclass
class StageConfig:
    """A stage of training: its steps, dataset mix, context length and tracks."""

    name: str = "main"
    steps: int = 100
    context_length: int = 512
    weights: dict[str, float] = field(default_factory=dict)  # dataset -> weight (override)
    sequence_weight: float | None = None  # type-level weights (None: the data section's)
    structure_weight: float | None = None
    tracks: list[str] = field(default_factory=lambda: list(TRACKS))


@dataclass
class DataConfig:
    datasets: list[DatasetSpec] = field(default_factory=list)
    sequence_weight: float = 1.0  # share of sequence datasets in a batch (before normalizing)
    structure_weight: float = 1.0  # share of structure datasets
    # a step's batch, all ranks together: set exactly one of the two (the other 0)
    batch_size: int = 0  # samples per step (small runs)
    batch_tokens: int = 0  # positions per step: rows of the stage's context length, packed
    pack: bool = False  # batch_size: pack samples into rows of the context length
    workers: int = 1  # loader worker processes per rank (0: in the training process)
    prefetch: int = 4  # batches each worker prepares ahead
    inverse_folding_prob: float = 0.5  # the 50/50 rule (structure with generated sequence)
    # pretrain: ESM3; inverse_folding: sequence from structure; vqvae: the structure
    # tokenizer (a VQ-VAE model preset)
    task: Literal["pretrain", "inverse_folding", "vqvae"] = "pretrain"
    max_records: int = 0  # 0: all; else the first N records per dataset (demos, benchmarks)
    # the function / residue-annotation vocabulary file preprocessing wrote (JSON; relative
    # paths are under the workspace's data/ folder); "" keeps tasks.function_files /
    # tasks.residue_labels as given (empty: those tracks are never trained)
    vocabulary: str = ""


@dataclass
class OptimConfig:
    """AdamW and the LR schedule (paper A.2.3)."""

    lr: float = 4e-4  # peak LR (unless scale_lr)
    scale_lr: bool = False  # peak = base_lr * sqrt(reference_params / params)
    base_lr: float = 4e-4
    reference_params: int = 0  # parameters of the model base_lr was tuned on
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.01
    clip: float = 1.0
    warmup_steps: int = 5000
    min_lr_ratio: float = 0.1  # cosine decays to this fraction of the peak


@dataclass
class CheckpointConfig:
    every: int = 1000  # steps between checkpoints (0: only on preemption and at the end)
    keep: int = 3  # keep the last K complete checkpoints
    async_save: bool = False  # torch.distributed.checkpoint.async_save (overlaps training)
    resume: bool = True  # resume from the run's latest complete checkpoint
    init_from: str = ""  # a checkpoint directory to start from (weights only)


@dataclass
class StabilityConfig:
    """Non-finite skipping, spike detection against a rolling median, PaLM-style rollback."""

    window: int = 100  # steps in the rolling median
    min_history: int = 10  # steps needed before spikes are judged
    loss_spike: float = 1.5  # loss > loss_spike * median loss is a spike
    grad_spike: float = 5.0  # grad norm > grad_spike * median grad norm is a spike
    max_nonfinite: int = 20  # consecutive non-finite steps before the run stops
    rollback: bool = False
    rollback_spikes: int = 3  # spikes within rollback_window steps trigger a rollback
    rollback_window: int = 10
    max_rollbacks: int = 5
    # fault injection (tests, drills): data indices whose batch gets a NaN / scaled loss
    inject_nan: list[int] = field(default_factory=list)
    inject_spike: list[int] = field(default_factory=list)
    spike_scale: float = 100.0


@dataclass
class ParallelConfig:
    # auto: bf16 on CUDA, fp32 on CPU; bf16 asked for on CPU runs the GPU's mixed-precision
    # path (FSDP2 over gloo; for tests: bf16 is slow on most CPUs)
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # FP8 matmuls on Ada/Hopper: TransformerEngine's with model.linear = "te", torchao's
    # float8 training (esm3.train.float8) with model.linear = "torch"
    fp8: bool = False
    activation_checkpointing: bool = False  # per transformer block
    reshard_after_forward: bool = True
    peak_tflops: float = 0.0  # per device, for MFU; 0: from the device name (CUDA only)
    threads: int = 0  # torch intra-op threads per rank (0: torch's default)


@dataclass
class ValidationConfig:
    """Validation loss during training (esm3.train.validation): every `every` steps (and at
    the last), the first `rows` proteins per dataset of the validation sets, chosen by a
    hash seeded with `seed`, corrupted as in training under that seed.

    files: Parquet paths or globs (relative ones under the workspace's `data/` folder) of
    validation sets with `id`, `dataset` and `sequence` columns, as the purge writes them.
    """

    every: int = 0  # steps between evaluations (0: off)
    rows: int = 25_000  # proteins per dataset (the paper's validation size)
    seed: int = 0
    files: list[str] = field(default_factory=list)
    batch_size: int = 8  # proteins per rank per forward pass
    # training datasets that give up `rows` records each (chosen by a hash of the record
    # row) to validation, never drawn for training: held-out structures for a run without
    # validation files (the structure tokenizer's reconstruction RMSD and lDDT)
    holdout: list[str] = field(default_factory=list)

    def check(self) -> None:
        _at_least("validation.every", self.every, 0)
        _at_least("validation.rows", self.rows, 1)
        _at_least("validation.seed", self.seed, 0)  # numpy seeds are non-negative
        _at_least("validation.batch_size", self.batch_size, 1)
        if self.every and not self.files and not self.holdout:
            raise _bad("validation.files", "lists no file (and validation.holdout no dataset) "
                       "while validation.every > 0")  # fmt: skip


@dataclass
class TrainConfig:
    name: str = "train"
    seed: int = 0
    model: ModelSection = field(default_factory=ModelSection)
    tasks: TaskConfig = field(default_factory=TaskConfig)
    loss_weights: dict[str, float] = field(
        default_factory=lambda: {t: 1.0 for t in CATEGORICAL_TRACKS}
    )
    data: DataConfig = field(default_factory=DataConfig)
    stages: list[StageConfig] = field(default_factory=lambda: [StageConfig()])
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    stability: StabilityConfig = field(default_factory=StabilityConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    log_every: int = 1  # write a train_steps row every N steps
    update_ratio_every: int = 1  # compute the update-to-weight ratio every N steps (0: never)

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.stages)

    def model_config(self) -> ModelConfig | VQVAEConfig:
        """The model, its vocabulary sizes those of the tokenizers (`TaskConfig.track_sizes`);
        the VQ-VAE's config for a VQ-VAE preset."""
        if self.model.is_vqvae:
            return self.model.build_vqvae()
        te_fp8 = self.parallel.fp8 and self.model.linear == "te"  # torchao's: parallelize
        return self.model.build(fp8=te_fp8, tracks=self.tasks.track_sizes())

    def stage_at(self, step: int) -> tuple[int, StageConfig]:
        """(index, stage) that training step `step` (0-based) belongs to; the last stage
        continues past the end."""
        end = 0
        for i, s in enumerate(self.stages):
            end += s.steps
            if step < end:
                return i, s
        return len(self.stages) - 1, self.stages[-1]

    def validate(self) -> None:
        """Every value in its range; the first bad one is a one-line TrainConfigError."""
        if self.model.preset not in PRESETS and not self.model.is_vqvae:
            known = ", ".join([*PRESETS, *VQVAE_PRESETS])
            raise _bad("model.preset", f"{self.model.preset!r} is not one of {known}")
        self.model.check()
        self._validate_task()
        mc = self.model_config()
        self._validate_data()
        self._validate_stages(mc.context_length)
        self._validate_optim()
        self._validate_intervals()
        self.validation.check()
        unknown_holdout = set(self.validation.holdout) - {ds.name for ds in self.data.datasets}
        if unknown_holdout:
            raise _bad("validation.holdout", f"names dataset(s) {sorted(unknown_holdout)} not "
                       "in data.datasets")  # fmt: skip
        if self.parallel.fp8 and self.model.is_vqvae:
            raise _bad("parallel.fp8", "FP8 is for the ESM3 transformer, not the VQ-VAE; "
                       "set parallel.fp8 = false")  # fmt: skip
        _at_least("parallel.peak_tflops", self.parallel.peak_tflops, 0)
        _at_least("parallel.threads", self.parallel.threads, 0)
        for key, w in self.model.loss_weights.items():
            _at_least(f"model.loss_weights.{key}", w, 0)
        unknown_w = set(self.loss_weights) - set(CATEGORICAL_TRACKS)
        if unknown_w:
            raise _bad("loss_weights", f"unknown tracks {sorted(unknown_w)}")
        for track, w in self.loss_weights.items():
            _at_least(f"loss_weights.{track}", w, 0)

    def _validate_task(self) -> None:
        """A VQ-VAE preset trains the structure tokenizer (data.task = vqvae) and nothing else."""
        vq, task = self.model.is_vqvae, self.data.task
        if vq != (task == "vqvae"):
            raise _bad(
                "data.task",
                f"{task!r} with model.preset {self.model.preset!r}: the VQ-VAE presets "
                f"({', '.join(VQVAE_PRESETS)}) train with data.task = 'vqvae', and only they do",
            )
        if not vq:
            return
        if any(ds.type != "structure" for ds in self.data.datasets):
            raise _bad("data.task", "the structure tokenizer trains on structure datasets only")
        stage = self.model.build_vqvae().stage
        if stage == 2 and not self.model.stage1_checkpoint:
            raise _bad("model.stage1_checkpoint", "stage 2 freezes a trained stage-1 encoder "
                       "and codebook: name the stage-1 checkpoint")  # fmt: skip
        if stage == 1 and self.model.stage1_checkpoint:
            raise _bad("model.stage1_checkpoint", "only stage 2 starts from a stage-1 checkpoint")

    def _validate_data(self) -> None:
        d = self.data
        names = [ds.name for ds in d.datasets]
        if not names:
            raise _bad("data.datasets", "no dataset configured")
        if len(set(names)) != len(names) or not all(names):
            raise _bad("data.datasets", f"dataset names must be unique and non-empty: {names}")
        for i, ds in enumerate(d.datasets):
            key = f"data.datasets[{i}]"
            if bool(ds.source) == bool(ds.shards):
                raise _bad(f"{key}.source", f"dataset {ds.name!r}: set exactly one of source "
                           "('<preprocess config>:<dataset>') and shards (globs)")  # fmt: skip
            if ds.source and (ds.source.count(":") != 1 or not all(ds.source.split(":"))):
                raise _bad(f"{key}.source", f"{ds.source!r} is not '<preprocess config>:<dataset>'")
            if ds.source and ds.clusters:
                raise _bad(f"{key}.clusters", "a source's store has its clusters; drop the key")
            _at_least(f"{key}.weight", ds.weight, 0)
        _at_least("data.batch_size", d.batch_size, 0)
        _at_least("data.batch_tokens", d.batch_tokens, 0)
        if (d.batch_size > 0) == (d.batch_tokens > 0):
            raise _bad(
                "data.batch_tokens",
                "set exactly one of data.batch_size (samples per step) and data.batch_tokens "
                f"(tokens per step), the other 0; got batch_size={d.batch_size}, "
                f"batch_tokens={d.batch_tokens}",
            )
        _at_least("data.workers", d.workers, 0)
        _at_least("data.prefetch", d.prefetch, 1)  # 0 would be an unbounded queue
        _at_least("data.max_records", d.max_records, 0)
        _at_least("data.sequence_weight", d.sequence_weight, 0)
        _at_least("data.structure_weight", d.structure_weight, 0)
        _in_range("data.inverse_folding_prob", d.inverse_folding_prob, 0, 1)
        if d.task == "inverse_folding" and any(ds.type != "structure" for ds in d.datasets):
            raise _bad("data.task", "inverse folding trains on structure datasets only")

    def _validate_stages(self, model_context: int) -> None:
        if not self.stages:
            raise _bad("stages", "at least one stage is needed")
        names = [ds.name for ds in self.data.datasets]
        for i, s in enumerate(self.stages):
            key = f"stages[{i}]"
            _at_least(f"{key}.steps", s.steps, 1)
            _at_least(f"{key}.context_length", s.context_length, 3)
            if s.context_length > model_context:
                raise _bad(
                    f"{key}.context_length",
                    f"must be <= {model_context} (the model's context length), "
                    f"got {s.context_length}",
                )
            unknown = set(s.weights) - set(names)
            if unknown:
                raise _bad(
                    f"{key}.weights",
                    f"names dataset(s) {sorted(unknown)} not in data.datasets ({names})",
                )
            if self.data.batch_tokens % s.context_length:
                raise _bad(
                    "data.batch_tokens",
                    f"{self.data.batch_tokens} tokens per step is not a whole number of rows of "
                    f"{key}.context_length {s.context_length}",
                )
            for ds, w in s.weights.items():
                _at_least(f"{key}.weights.{ds}", w, 0)
            for kind in ("sequence_weight", "structure_weight"):
                if getattr(s, kind) is not None:
                    _at_least(f"{key}.{kind}", getattr(s, kind), 0)
            bad_tracks = set(s.tracks) - set(TRACKS)
            if bad_tracks or "sequence" not in s.tracks:
                raise _bad(
                    f"{key}.tracks",
                    f"{s.tracks}: must include 'sequence', allowed {', '.join(TRACKS)}",
                )

    def _validate_optim(self) -> None:
        o = self.optim
        _above("optim.lr", o.lr, 0)
        _above("optim.base_lr", o.base_lr, 0)
        if o.scale_lr and o.reference_params <= 0:
            raise _bad("optim.reference_params", "must be > 0 when optim.scale_lr is true")
        _in_range("optim.beta1", o.beta1, 0, 1, high_open=True)
        _in_range("optim.beta2", o.beta2, 0, 1, high_open=True)
        _above("optim.eps", o.eps, 0)
        _at_least("optim.weight_decay", o.weight_decay, 0)
        _above("optim.clip", o.clip, 0)
        _at_least("optim.warmup_steps", o.warmup_steps, 0)
        _in_range("optim.min_lr_ratio", o.min_lr_ratio, 0, 1)

    def _validate_intervals(self) -> None:
        # 0 keeps its documented meaning where a field has one (never / only at the end)
        _at_least("log_every", self.log_every, 1)
        _at_least("update_ratio_every", self.update_ratio_every, 0)
        _at_least("checkpoint.every", self.checkpoint.every, 0)
        _at_least("checkpoint.keep", self.checkpoint.keep, 1)
        st = self.stability
        _at_least("stability.window", st.window, 3)
        _at_least("stability.min_history", st.min_history, 1)
        _above("stability.loss_spike", st.loss_spike, 1)
        _above("stability.grad_spike", st.grad_spike, 1)
        _at_least("stability.max_nonfinite", st.max_nonfinite, 0)
        _at_least("stability.rollback_spikes", st.rollback_spikes, 1)
        _at_least("stability.rollback_window", st.rollback_window, 1)
        _at_least("stability.max_rollbacks", st.max_rollbacks, 0)
        _above("stability.spike_scale", st.spike_scale, 0)

    def check_world_size(self, world_size: int) -> int:
        """A rank's share of a step: samples (data.batch_size) or positions
        (data.batch_tokens); raises when the world size does not divide the batch, or a
        rank's positions are not whole rows of every stage's context length."""
        d = self.data
        if not d.batch_tokens:
            if d.batch_size % world_size:
                raise _bad(
                    "data.batch_size",
                    f"{d.batch_size} samples per step is not divisible by the world size "
                    f"{world_size} (nodes x tasks per node)",
                )
            return d.batch_size // world_size
        per_rank = d.batch_tokens // world_size
        for i, s in enumerate(self.stages):
            if d.batch_tokens % world_size or per_rank % s.context_length:
                raise _bad(
                    "data.batch_tokens",
                    f"{d.batch_tokens} tokens per step over the world size {world_size} "
                    f"(nodes x tasks per node) is not a whole number of rows of "
                    f"stages[{i}].context_length {s.context_length} per rank; use a multiple "
                    f"of {world_size * s.context_length}",
                )
        return per_rank

    def tokens_per_rank(self, world_size: int) -> int:
        """Most positions one rank's batch can hold in a step (any stage)."""
        if self.data.batch_tokens:
            return -(-self.data.batch_tokens // max(1, world_size))
        per_rank = -(-self.data.batch_size // max(1, world_size))
        return per_rank * max(s.context_length for s in self.stages)

    def min_step_bytes(self, world_size: int) -> int:
        """A lower bound on one rank's memory for a training step (bytes).

        Counts only what must exist at once: the FSDP-sharded fp32 weights, gradients and
        two AdamW moments (16 bytes per parameter over the world), the rank's token ids,
        each block's bf16 input kept for the backward pass, and the bf16 logits of the
        output heads. Real use is higher (attention, FFN, workers), so a config over this
        bound cannot run.
        """
        from esm3.model.config import param_count

        mc = self.model_config()
        if isinstance(mc, VQVAEConfig):
            return self._vqvae_step_bytes(mc, world_size)
        states = 16 * param_count(mc) // max(1, world_size)
        tokens = self.tokens_per_rank(world_size)
        ids = tokens * 8 * len(TRACKS)
        residual = tokens * mc.d_model * mc.n_layers * 2
        logits = tokens * sum(mc.tracks.head_outputs(t) for t in mc.heads) * 2
        return states + ids + residual + logits

    def _vqvae_step_bytes(self, mc: VQVAEConfig, world_size: int) -> int:
        """`min_step_bytes` of the structure tokenizer: sharded states, the encoder's
        neighbourhoods (knn positions per residue, fp32), the decoder's block inputs and
        the pairwise logits (distogram and direction bins: context x context per row)."""
        from esm3.model.vqvae.model import vqvae_param_count

        enc, dec = mc.encoder, mc.decoder
        states = 16 * vqvae_param_count(mc) // max(1, world_size)
        tokens = self.tokens_per_rank(world_size)
        width = max(s.context_length for s in self.stages)
        neighbourhoods = tokens * enc.knn * enc.d_model * enc.n_layers * 4
        residual = tokens * dec.d_model * dec.n_layers * 2
        pairwise = tokens * width * (64 + 6 * 16) * 4
        return states + neighbourhoods + residual + pairwise
