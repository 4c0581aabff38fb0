"""The training store: batches equal to the in-memory loader's, resident memory independent
of the number of records, a dry run that opens manifests only, one-line refusals of a
missing, truncated or older store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from esm3.data.store import VERSION, StoreSources, open_store, write_store
from esm3.train.data import BatchBuilder, load_datasets
from esm3.train.stores import adhoc_sources
from jobs.bench.in_memory_loader import load_in_memory
from jobs.config import ConfigError
from jobs.train.config import check_inputs, load_config
from tests.train.conftest import write_config

ROOT = Path(__file__).resolve().parents[2]


def _clusters_out_of_order(shard: Path, out: Path) -> None:
    """Clusters of 1-4 members, rows shuffled (not grouped by center: the sorted path), and
    one member without a record (dropped)."""
    ids = pq.read_table(shard, columns=["id"]).column("id").to_pylist()
    rng = np.random.default_rng(0)
    centers = [ids[i - i % int(rng.integers(1, 5))] for i in range(len(ids))]
    rows = list(zip(centers, ids, strict=True)) + [(ids[0], "no-such-record")]
    order = rng.permutation(len(rows))
    pq.write_table(
        pa.table({"center": [rows[i][0] for i in order], "member": [rows[i][1] for i in order]}),
        out,
    )


def _generated(shard: Path, out: Path) -> None:
    """Two same-length sequences for every other structure, in shuffled order."""
    t = pq.read_table(shard, columns=["id", "sequence"]).to_pylist()
    rows = [(r["id"], r["sequence"][k:] + r["sequence"][:k]) for r in t[::2] for k in (1, 2)]
    order = np.random.default_rng(1).permutation(len(rows))
    pq.write_table(
        pa.table({"id": [rows[i][0] for i in order], "sequence": [rows[i][1] for i in order]}),
        out,
    )


def test_store_batches_equal_the_in_memory_loader(tmp_path, train_data):
    seqs = next((train_data / "real" / "sequences").glob("*.parquet"))
    structs = next((train_data / "real" / "structures").glob("*.parquet"))
    _clusters_out_of_order(seqs, tmp_path / "clusters.parquet")
    _generated(structs, tmp_path / "generated.parquet")
    over = [
        "data.inverse_folding_prob=0.5",
        f"data.datasets=[{{name='uniprot', type='sequence', shards=['{seqs}'], "
        f"clusters=['{tmp_path}/clusters.parquet']}}, {{name='pdb', type='structure', "
        f"shards=['{structs}'], inverse_folded=['{tmp_path}/generated.parquet']}}]",
    ]
    cfg = load_config(write_config(tmp_path / "c.toml", train_data), over)
    stores = load_datasets(cfg, tmp_path)
    legacy = {
        d.name: load_in_memory(d.name, d.type, adhoc_sources(d, tmp_path))
        for d in cfg.data.datasets
    }
    for name, ds in stores.items():
        assert np.array_equal(ds.clusters.offsets, legacy[name].clusters.offsets), name
        assert np.array_equal(ds.member_rows, legacy[name].member_rows), name
        assert [ds.generated(r) for r in range(len(ds))] == [
            legacy[name].generated(r) for r in range(len(ds))
        ]
    assert stores["uniprot"].dropped_members == 1
    assert sum(len(stores["pdb"].generated(r)) for r in range(len(stores["pdb"]))) == 2 * len(
        range(0, len(stores["pdb"]), 2)
    )
    for rank in (0, 1):
        a = BatchBuilder(cfg, stores, rank=rank, per_rank=4)
        b = BatchBuilder(cfg, legacy, rank=rank, per_rank=4)
        for step in (0, 3, 7, 11):
            x, y = a.build(step, step), b.build(step, step)
            for part in ("inputs", "targets", "loss_masks"):
                px, py = getattr(x, part), getattr(y, part)
                assert px.keys() == py.keys()
                for k in px:
                    assert torch.equal(torch.nan_to_num(px[k]), torch.nan_to_num(py[k])), (
                        rank, step, part, k,
                    )  # fmt: skip


# --- resident memory -----------------------------------------------------------------------

AA = np.frombuffer(b"ACDEFGHIKLMNPQRSTVWY", dtype=np.uint8)


def _synthetic_store(root: Path, n: int) -> Path:
    """n records (lengths 40-400, lognormal), in clusters of heavy-tailed sizes, as a store."""
    rng = np.random.default_rng(n)
    lengths = np.clip(rng.lognormal(np.log(120), 0.5, n), 40, 400).astype(np.int64)
    offsets = np.concatenate(([0], np.cumsum(lengths))).astype(np.int32)
    residues = AA[rng.integers(0, len(AA), int(offsets[-1]))]
    seqs = pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(residues.tobytes()))
    ids = pa.array([f"R{i}" for i in range(n)])
    sizes = np.minimum(rng.zipf(1.8, n), 1000)
    center_of = np.repeat(np.arange(n), sizes)[:n]
    (root / "in").mkdir(parents=True)
    pq.write_table(pa.table({"id": ids, "sequence": seqs, "length": lengths.astype(np.int32)}),
                   root / "in" / "records.parquet", row_group_size=100_000)  # fmt: skip
    pq.write_table(pa.table({"center": ids.take(pa.array(center_of)), "member": ids}),
                   root / "in" / "clusters.parquet")  # fmt: skip
    sources = StoreSources(
        [root / "in" / "records.parquet"], [root / "in" / "clusters.parquet"], []
    )
    write_store(root / "store", "syn", "sequence", sources, memory_limit="1GB")
    return root / "store"


RSS_CHILD = textwrap.dedent(
    """
    import sys
    import torch
    torch.set_num_threads(1)
    from esm3.train.data import BatchBuilder, open_dataset
    from jobs.train.config import load_config

    def rss_anon_kb():
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1])

    cfg = load_config(None, ["data.datasets=[{name='syn', type='sequence', shards=['x']}]",
                             "data.batch_size=8", "data.workers=0",
                             "stages=[{name='s', steps=1000, context_length=256}]"])
    ds = {"syn": open_dataset("syn", sys.argv[1])}
    builder = BatchBuilder(cfg, ds, rank=0, per_rank=8)
    for step in range(200):
        builder.build(step, step)
    print(rss_anon_kb())
    """
)


def _rss_after_batches(store: Path) -> int:
    out = subprocess.run(
        [sys.executable, "-c", RSS_CHILD, str(store)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return int(out.stdout.split()[-1])


def test_resident_memory_does_not_grow_with_records(tmp_path):
    small = _rss_after_batches(_synthetic_store(tmp_path / "small", 10_000))
    large_store = _synthetic_store(tmp_path / "large", 1_000_000)
    large = _rss_after_batches(large_store)
    records_mb = (large_store / "records.arrow").stat().st_size / 2**20
    # the old loader held every record in memory: ~150 MB more here, which this would catch
    assert abs(large - small) <= 0.2 * small, (
        f"RssAnon after 200 batches: {small / 1024:.0f} MiB at 10^4 records, "
        f"{large / 1024:.0f} MiB at 10^6 ({records_mb:.0f} MiB of records)"
    )
    assert records_mb > 0.5 * small / 1024  # the large store is big enough to be seen


# --- the submitting host: manifests only; bad stores refused in one line ------------------


def _preprocessed(ws: Path, train_data: Path) -> Path:
    """A workspace whose preprocessing config 'pp' wrote stores for 'uniprot' and 'pdb'."""
    root = ws / "data" / "preprocess" / "pp"
    entries = {}
    for name, kind, sub in (
        ("uniprot", "sequence", "sequences"),
        ("pdb", "structure", "structures"),
    ):
        shards = sorted((train_data / "real" / sub).glob("*.parquet"))
        write_store(root / "stores" / name, name, kind, StoreSources(shards, [], []))
        entries[name] = {"type": kind, "shards": [str(s) for s in shards], "clusters": None,
                         "store": str(root / "stores" / name)}  # fmt: skip
    (root / "manifest.json").write_text(json.dumps({"config": "pp", "datasets": entries}))
    return root


def _source_config(tmp_path: Path, train_data: Path, source: str = "pp") -> object:
    over = [
        f"data.datasets=[{{name='uniprot', type='sequence', source='{source}:uniprot'}}, "
        f"{{name='pdb', type='structure', source='{source}:pdb'}}]"
    ]
    return load_config(write_config(tmp_path / "c.toml", train_data), over)


def test_bad_stores_are_refused_in_one_line_before_any_rank(tmp_path, train_data):
    ws = tmp_path / "ws"
    root = _preprocessed(ws, train_data)
    cfg = _source_config(tmp_path, train_data)
    assert check_inputs(cfg, ws, 1)["records"] == {
        "uniprot": 300,
        "pdb": len(open_store(root / "stores" / "pdb")),
    }

    def refused(match: str) -> None:
        with pytest.raises(ConfigError, match=match) as e:
            check_inputs(cfg, ws, 1)
        assert "\n" not in str(e.value)

    meta_file = root / "stores" / "pdb" / "store.json"
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({**meta, "version": VERSION - 1}))
    refused(rf"dataset 'pdb': store .*pdb: written by store format version {VERSION - 1}, this "
            rf"suite reads version {VERSION}")  # fmt: skip
    meta_file.write_text(json.dumps(meta))
    records = root / "stores" / "pdb" / "records.arrow"
    size = records.stat().st_size
    os.truncate(records, size // 2)
    refused(rf"store .*pdb: records.arrow is {size // 2} bytes, store.json says {size} \(truncated")
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["datasets"]["pdb"]["store"] = str(root / "stores" / "gone")
    (root / "manifest.json").write_text(json.dumps(manifest))
    refused(r"dataset 'pdb': store .*gone: missing \(no store.json\)")
    del manifest["datasets"]["pdb"]
    (root / "manifest.json").write_text(json.dumps(manifest))
    refused(r"source 'pp:pdb'\): manifest .* has no dataset 'pdb' \(it has: uniprot\)")
    cfg = _source_config(tmp_path, train_data, source="nope")
    refused(
        r"no preprocessing manifest .*nope/manifest.json; run `esm3 preprocess all --config nope`"
    )


def _opened_under(trace: Path, folder: Path) -> set[str]:
    """Names of the files under `folder` that an strace log shows opened (any process)."""
    names = set()
    for line in trace.read_text().splitlines():
        if "open" in line and '"' in line:
            path = line.split('"')[1]
            if path.startswith(str(folder)) and "ENOENT" not in line:
                names.add(Path(path).name)
    return names


def test_dry_run_opens_only_manifests(tmp_path, train_data):
    ws = tmp_path / "ws"
    root = _preprocessed(ws, train_data)
    (root / "sequences").mkdir()
    val = next((train_data / "real" / "validation").glob("*.parquet"))
    (root / "sequences" / "validation.parquet").write_bytes(val.read_bytes())
    cfg_path = tmp_path / "c.toml"
    write_config(cfg_path, train_data, "[validation]\nevery = 2\nrows = 3\n"
                 'files = ["preprocess/pp/sequences/validation.parquet"]\n')  # fmt: skip
    datasets = ("data.datasets=[{name='uniprot', type='sequence', source='pp:uniprot'}, "
                "{name='pdb', type='structure', source='pp:pdb'}]")  # fmt: skip
    # strace sees every open, also those of pyarrow's and DuckDB's C++ code
    trace = tmp_path / "opens.trace"
    out = subprocess.run(
        ["strace", "-f", "-qq", "-e", "trace=open,openat,openat2", "-o", str(trace),
         sys.executable, "-m", "jobs.cli", "train", "--dry-run", "--workspace", str(ws),
         "--config", str(cfg_path), datasets],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "records {'uniprot': 300" in out.stdout
    assert _opened_under(trace, ws / "data") == {"manifest.json", "store.json"}
