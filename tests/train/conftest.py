"""Shared training-test data (built once per session) and a tiny-model config writer."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.train.fixtures import sequence_shard, structure_shard, validation_set


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
