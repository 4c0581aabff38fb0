"""Inventories: the parallel walk lists what `glob` lists, in the same order; row ranges
read back exactly; the metadata prefilter keeps what the thresholds keep."""

from __future__ import annotations

import glob
import random

import pyarrow.parquet as pq
import pytest

from esm3.data import inventory as inv
from jobs.arrays import IndexedItems, JoinedItems


@pytest.fixture
def tree(tmp_path):
    rng = random.Random(3)
    root = tmp_path / "afdb"
    for shard in ("00", "01", "0a", "10"):
        for k in range(rng.randint(3, 9)):
            f = root / shard / f"AF-P{rng.randint(10_000, 99_999)}{k}-F1-model_v4.cif.gz"
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_bytes(b"x" * rng.randint(0, 50))
    (root / "00" / ".partial.cif.gz").write_bytes(b"")  # hidden: glob skips it
    (root / "00" / "nested.cif.gz").mkdir()  # a folder named like a file
    (root / "01" / "bundle.tar").write_bytes(b"")
    (root / "README").write_text("not matched")
    return root


def _listed(folder, name="files.parquet"):
    return pq.read_table(folder / name)["path"].to_pylist()


def test_walk_lists_what_glob_lists_in_the_same_order(tree, tmp_path, monkeypatch):
    monkeypatch.setattr(inv, "ROW_GROUP", 4)  # several row groups
    pattern = str(tree / "0*" / "*")
    s = inv.write_inventory([pattern], tmp_path / "inv", threads=3)
    expected = [p for p in sorted(glob.glob(pattern)) if not p.endswith((".tar", "nested.cif.gz"))]
    # glob sorts the whole list; the walk sorts within each folder, visited in order
    assert _listed(tmp_path / "inv") == expected
    assert _listed(tmp_path / "inv", "archives.parquet") == [str(tree / "01" / "bundle.tar")]
    assert (s.files, s.archives) == (len(expected), 1)
    table = pq.read_table(tmp_path / "inv" / "files.parquet")
    assert table["size"].to_pylist() == [len(open(p, "rb").read()) for p in expected]
    assert table["id"][0].as_py() == expected[0].rsplit("/", 1)[1].removesuffix(".cif.gz")
    assert pq.ParquetFile(tmp_path / "inv" / "files.parquet").num_row_groups > 1
    for start, stop in [(0, 1), (2, 9), (3, 4), (5, len(expected)), (len(expected) - 1, 10**6)]:
        assert (
            inv.read_paths(tmp_path / "inv" / "files.parquet", start, stop) == expected[start:stop]
        )


def test_overlapping_patterns_list_a_file_once_and_an_empty_one_is_named(tree, tmp_path):
    s = inv.write_inventory([str(tree / "00" / "*"), str(tree / "0[01]" / "*.cif.gz")],
                            tmp_path / "inv")  # fmt: skip
    paths = _listed(tmp_path / "inv")
    assert len(paths) == len(set(paths)) == s.files
    assert set(paths) == {p for p in glob.glob(str(tree / "0[01]" / "*.cif.gz"))
                          if not p.endswith("nested.cif.gz")}  # fmt: skip
    with pytest.raises(inv.InventoryError, match=r"dataset 'afdb': input '.*/zz/\*': no file"):
        inv.write_inventory([str(tree / "zz" / "*")], tmp_path / "inv2", where="dataset 'afdb'")


def test_prefilter_keeps_what_the_thresholds_keep(tmp_path):
    rng = random.Random(5)
    folder = tmp_path / "esm"
    ids = [f"MGYP{i:012d}" for i in range(300)]
    for i in ids:
        (folder / i[-2:]).mkdir(parents=True, exist_ok=True)
        (folder / i[-2:] / f"{i}.pdb.gz").write_bytes(b"")
    meta = {i: (rng.uniform(30, 100), rng.uniform(0.3, 1.0)) for i in ids if rng.random() < 0.9}
    lines = ["id,plddt,ptm"] + [f"{i},{p:.3f},{t:.4f}" for i, (p, t) in meta.items()]
    (tmp_path / "meta.csv").write_text("\n".join(lines) + "\n")
    inv.write_inventory([str(folder / "*" / "*.pdb.gz")], tmp_path / "inv")
    listed = pq.read_table(tmp_path / "inv" / "files.parquet")["id"].to_pylist()
    f = inv.Prefilter(str(tmp_path / "meta.csv"), 0.7, 0.7)
    counts = inv.prefilter_files(tmp_path / "inv" / "files.parquet", tmp_path / "kept.parquet", f)

    def keep(i):
        p, t = meta.get(i, (100.0, 1.0))  # without a row: kept for the stage to reject
        return round(p, 3) / 100 >= 0.7 and round(t, 4) >= 0.7

    expected = [i for i in listed if keep(i)]
    assert pq.read_table(tmp_path / "kept.parquet")["id"].to_pylist() == expected
    assert counts == {"listed": 300, "kept": len(expected), "dropped": 300 - len(expected),
                      "without_metadata": 300 - len(meta)}  # fmt: skip


def test_afdb_prefilter_matches_ids_without_the_model_suffix(tmp_path):
    for acc in ("P00001", "P00002", "P00003"):
        (tmp_path / f"AF-{acc}-F1-model_v4.cif.gz").write_bytes(b"")
    # AFDB's metadata: entry ids without the file's `-model_v4`, global pLDDT on 0-100
    (tmp_path / "meta.tsv").write_text("id\tplddt\nAF-P00001-F1\t91.2\nAF-P00002-F1\t55.0\n")
    inv.write_inventory([str(tmp_path / "*.cif.gz")], tmp_path / "inv")
    f = inv.Prefilter(str(tmp_path / "meta.tsv"), 0.7, None, strip_model_suffix=True)
    counts = inv.prefilter_files(tmp_path / "inv" / "files.parquet", tmp_path / "k.parquet", f)
    kept = pq.read_table(tmp_path / "k.parquet")["id"].to_pylist()
    assert kept == ["AF-P00001-F1-model_v4", "AF-P00003-F1-model_v4"]
    assert counts["dropped"] == 1 and counts["without_metadata"] == 1


def test_indexed_and_joined_items_give_each_range_its_rows():
    a = IndexedItems(5, lambda i: ("a", i))
    b = [("b", 0), ("b", 1)]
    c = IndexedItems(4, lambda i: ("c", i))
    joined = JoinedItems((a, b, c))
    every = [("a", i) for i in range(5)] + b + [("c", i) for i in range(4)]
    assert len(joined) == 11
    for start in range(12):
        for stop in range(start, 13):
            assert joined.rows(start, stop) == every[start:stop]
