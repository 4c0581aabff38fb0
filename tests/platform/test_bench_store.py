"""The store benchmark's synthetic data: what `make bench` measures must be a valid dataset
(every record in exactly one identity cluster, centers among their own members, real
lengths and composition) that both loaders read alike. No timings here."""

from __future__ import annotations

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from jobs.bench import bench_store as bs
from jobs.bench import synthetic


def test_synthetic_dataset_is_valid(tmp_path):
    data = bs.write_synthetic(tmp_path, 3000, seed=1)
    records = pq.read_table(data.shards)
    clusters = pq.read_table(data.clusters)
    assert records.num_rows == 3000 == data.records
    assert len(pc.unique(records["id"])) == 3000
    lengths = records["length"].to_numpy()
    assert (lengths == pc.utf8_length(records["sequence"]).to_numpy()).all()
    assert synthetic.LENGTH_MIN <= lengths.min() and lengths.max() <= synthetic.LENGTH_MAX
    assert 250 < lengths.mean() < 420 and int(lengths.sum()) == data.residues
    residues = "".join(records["sequence"].to_pylist()[:200])
    assert set(residues) <= set(synthetic.AA_PERCENT)
    assert abs(residues.count("L") / len(residues) - 0.0966) < 0.01
    # every record is a member exactly once; a center is its cluster's first member
    assert sorted(clusters["member"].to_pylist()) == sorted(records["id"].to_pylist())
    center, member = clusters["center"].to_pylist(), clusters["member"].to_pylist()
    firsts = [m for i, (c, m) in enumerate(zip(center, member, strict=True))
              if i == 0 or center[i - 1] != c]  # fmt: skip
    assert firsts == list(dict.fromkeys(center)) and len(firsts) == data.centers
    sizes = np.unique(np.array(center), return_counts=True)[1]
    assert (sizes == 1).mean() > 0.5 and sizes.max() > 5  # heavy-tailed, mostly singletons


def test_store_and_in_memory_loaders_agree(tmp_path):
    import torch

    from esm3.train.data import BatchBuilder, load_dataset

    data = bs.write_synthetic(tmp_path / "data", 2000, seed=2)
    cfg = bs._train_config(data)
    store = load_dataset(cfg.data.datasets[0], tmp_path / "root")
    old = bs.load_in_memory(data)
    assert len(store) == len(old) == 2000 and len(store.clusters) == data.centers
    a = BatchBuilder(cfg, {"synthetic": store}, rank=0, per_rank=4).build(3, 3)
    b = BatchBuilder(cfg, {"synthetic": old}, rank=0, per_rank=4).build(3, 3)
    for k in a.inputs:  # the same draws, records and corruption (coords: all NaN)
        torch.testing.assert_close(a.inputs[k], b.inputs[k], rtol=0, atol=0, equal_nan=True)
