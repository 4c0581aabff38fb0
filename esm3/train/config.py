"""The training config: one small dataclass per component, loaded from TOML.

Every field has the paper's default where the paper gives one (AdamW 0.9/0.95, weight decay
0.01, clipping 1.0, cosine to 10% of the peak). `validate()` raises `TrainConfigError`
(a ValueError with one line naming the key); the loader in `jobs/` turns it into the
suite's ConfigError.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from esm3.model.config import PRESETS, BackendConfig, ModelConfig, preset
from esm3.tasks.config import TaskConfig
from esm3.tokenize.tracks import CATEGORICAL_TRACKS

#: Tracks a stage can switch on or off ("coords" is the backbone-coordinate input).
TRACKS = ("sequence", "structure", "coords", "ss8", "sasa", "function", "residue")


class TrainConfigError(ValueError):
    """A bad training config; the message is one line naming the key."""


@dataclass
class ModelSection:
    """A preset of `esm3.model.config.PRESETS`, with optional size overrides."""

    preset: str = "tiny"
    d_model: int | None = None
    n_layers: int | None = None
    d_head: int | None = None
    context_length: int | None = None
    attention: Literal["sdpa", "xformers"] = "sdpa"
    linear: Literal["torch", "te"] = "torch"

    def build(self, fp8: bool = False) -> ModelConfig:
        over: dict[str, object] = {
            k: getattr(self, k)
            for k in ("d_model", "n_layers", "d_head", "context_length")
            if getattr(self, k) is not None
        }
        over["backend"] = BackendConfig(attention=self.attention, linear=self.linear, fp8=fp8)
        try:
            return preset(self.preset, **over)
        except (ValueError, TypeError) as e:
            raise TrainConfigError(f"config key 'model': {e}") from e


@dataclass
class DatasetSpec:
    """One training dataset: Parquet shards of records, optional cluster files.

    shards / clusters / inverse_folded are paths or globs; relative ones are under the
    workspace's `data/` folder. clusters: Parquet (center, member) from the sequence
    pipeline's expansion; empty: every record is its own cluster. inverse_folded: Parquet
    (id, sequence) of sequences generated for this dataset's structures.
    """

    name: str = ""
    type: Literal["sequence", "structure"] = "sequence"
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
    batch_size: int = 8  # samples per step, all ranks together
    pack: bool = False  # pack samples into rows of the context length (block-diagonal)
    workers: int = 1  # loader worker processes per rank (0: in the training process)
    prefetch: int = 4  # batches each worker prepares ahead
    inverse_folding_prob: float = 0.5  # the 50/50 rule (structure with generated sequence)
    task: Literal["pretrain", "inverse_folding"] = "pretrain"
    max_records: int = 0  # 0: all; else the first N records per dataset (demos, benchmarks)


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
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    fp8: bool = False  # TransformerEngine FP8 (needs model.linear = "te", Hopper)
    activation_checkpointing: bool = False  # per transformer block
    reshard_after_forward: bool = True
    peak_tflops: float = 0.0  # per device, for MFU; 0: from the device name (CUDA only)
    threads: int = 0  # torch intra-op threads per rank (0: torch's default)


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
    log_every: int = 1  # write a train_steps row every N steps
    update_ratio_every: int = 1  # compute the update-to-weight ratio every N steps (0: never)

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.stages)

    def model_config(self) -> ModelConfig:
        return self.model.build(fp8=self.parallel.fp8)

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
        def bad(key: str, msg: str) -> TrainConfigError:
            return TrainConfigError(f"config key '{key}': {msg}")

        if self.model.preset not in PRESETS:
            raise bad("model.preset", f"{self.model.preset!r} is not one of {', '.join(PRESETS)}")
        mc = self.model_config()
        if not self.stages:
            raise bad("stages", "at least one stage is needed")
        names = [d.name for d in self.data.datasets]
        if not names:
            raise bad("data.datasets", "no dataset configured")
        if len(set(names)) != len(names) or not all(names):
            raise bad("data.datasets", f"dataset names must be unique and non-empty: {names}")
        for i, d in enumerate(self.data.datasets):
            if not d.shards:
                raise bad(f"data.datasets[{i}].shards", f"dataset {d.name!r} lists no shards")
            if d.weight < 0:
                raise bad(f"data.datasets[{i}].weight", f"{d.weight} must be >= 0")
        if self.data.batch_size < 1:
            raise bad("data.batch_size", f"{self.data.batch_size} must be >= 1")
        if self.data.task == "inverse_folding":
            if any(d.type != "structure" for d in self.data.datasets):
                raise bad("data.task", "inverse folding trains on structure datasets only")
        if not 0.0 <= self.data.inverse_folding_prob <= 1.0:
            raise bad("data.inverse_folding_prob", "must be in [0, 1]")
        for i, s in enumerate(self.stages):
            key = f"stages[{i}]"
            if s.steps < 1:
                raise bad(f"{key}.steps", f"{s.steps} must be >= 1")
            if not 3 <= s.context_length <= mc.context_length:
                raise bad(
                    f"{key}.context_length",
                    f"{s.context_length} must be in [3, {mc.context_length}] (the model's)",
                )
            unknown = set(s.weights) - set(names)
            if unknown:
                raise bad(
                    f"{key}.weights",
                    f"names dataset(s) {sorted(unknown)} not in data.datasets ({names})",
                )
            bad_tracks = set(s.tracks) - set(TRACKS)
            if bad_tracks or "sequence" not in s.tracks:
                raise bad(
                    f"{key}.tracks",
                    f"{s.tracks}: must include 'sequence', allowed {', '.join(TRACKS)}",
                )
        o = self.optim
        if o.scale_lr and o.reference_params <= 0:
            raise bad("optim.reference_params", "must be > 0 when optim.scale_lr is true")
        if not 0 <= o.min_lr_ratio <= 1:
            raise bad("optim.min_lr_ratio", f"{o.min_lr_ratio} must be in [0, 1]")
        if o.warmup_steps < 0 or o.clip <= 0:
            raise bad("optim", "warmup_steps must be >= 0 and clip > 0")
        if self.checkpoint.keep < 1:
            raise bad("checkpoint.keep", f"{self.checkpoint.keep} must be >= 1")
        st = self.stability
        if st.window < 3 or st.min_history < 1 or st.loss_spike <= 1 or st.grad_spike <= 1:
            raise bad("stability", "window >= 3, min_history >= 1, spike factors > 1 required")
        if self.parallel.fp8 and self.model.linear != "te":
            raise bad("parallel.fp8", "FP8 needs model.linear = 'te' (TransformerEngine)")
        unknown_w = set(self.loss_weights) - set(CATEGORICAL_TRACKS)
        if unknown_w:
            raise bad("loss_weights", f"unknown tracks {sorted(unknown_w)}")

    def check_world_size(self, world_size: int) -> int:
        """Samples per rank per step; raises when the world size does not divide the batch."""
        if self.data.batch_size % world_size:
            raise TrainConfigError(
                f"config key 'data.batch_size': {self.data.batch_size} samples per step is not "
                f"divisible by the world size {world_size} (nodes x tasks per node)"
            )
        return self.data.batch_size // world_size
