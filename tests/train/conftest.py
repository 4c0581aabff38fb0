"""Shared training-test data (built once per session) and a tiny-model config writer."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.train.fixtures import sequence_shard, structure_shard, validation_set


@pytest.fixture(scope="module")
def process_group(tmp_path_factory):
    """A one-rank gloo process group for the module's in-process training runs."""
    import torch.distributed as dist

    store = tmp_path_factory.mktemp("pg") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def stop_after_calls(calls: int | None):
    """A `should_stop` that asks to stop (as a preemption would) at its calls-th call."""
    seen = {"n": 0}

    def stop() -> bool:
        seen["n"] += 1
        return calls is not None and seen["n"] >= calls

    return stop


@pytest.fixture(scope="session")
def train_data(tmp_path_factory) -> Path:
    """A data folder with real sequence and structure shards (see fixtures.py)."""
    root = tmp_path_factory.mktemp("train-data")
    sequence_shard(root / "real", n=300, max_len=120)
    structure_shard(root / "real")
    validation_set(root / "real")
    return root


def data_root(cfg) -> Path:
    """The data folder of a config written by `write_config` (shards at <root>/real/<kind>/):
    where the loader writes the ad-hoc stores of its globbed datasets."""
    return Path(cfg.data.datasets[0].shards[0]).parents[2]


def write_config(path: Path, data_root: Path, extra: str = "", **sections: str) -> Path:
    """A tiny-model TOML over the session's real shards; `extra` is appended verbatim."""
    text = f"""
name = "test"
seed = 0
[model]
preset = "tiny"
d_model = 64
n_layers = 2
d_head = 32
context_length = 128
[data]
batch_size = 4
workers = 0
[[data.datasets]]
name = "uniprot"
type = "sequence"
shards = ["{data_root}/real/sequences/*.parquet"]
[[data.datasets]]
name = "pdb"
type = "structure"
shards = ["{data_root}/real/structures/*.parquet"]
[optim]
lr = 3e-3
warmup_steps = 2
[stability]
min_history = 3
window = 20
{
        sections.get(
            "stages",
            '''
[[stages]]
name = "seq"
steps = 3
context_length = 64
tracks = ["sequence"]
[[stages]]
name = "all"
steps = 5
context_length = 128
''',
        )
    }
{extra}
"""
    path.write_text(text)
    return path
