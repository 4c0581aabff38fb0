"""The in-memory loader that the training store replaced: every shard read into Arrow
tables, the cluster index built with string lookups. It stays only as the baseline of the
store benchmark and the reference of the store's tests, and offers what BatchBuilder uses
of a dataset (protein, generated, clusters, member_rows)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from esm3.data.sampler import ClusterIndex
from esm3.data.store import COLUMNS, StoreSources
from esm3.tasks.sample import Protein


@dataclass
class InMemoryDataset:
    name: str
    type: str
    records: pa.Table
    clusters: ClusterIndex
    member_rows: np.ndarray
    by_id: dict[str, list[str]] = field(default_factory=dict)

    def protein(self, row: int) -> Protein:
        rec = {k: v[0] for k, v in self.records.slice(row, 1).to_pydict().items()}
        rec["dataset"] = self.name
        return Protein.from_record(rec)

    def generated(self, row: int) -> list[str]:
        return self.by_id.get(self.records.column("id")[row].as_py(), [])

    def __len__(self) -> int:
        return self.records.num_rows


def load_in_memory(name: str, type: str, sources: StoreSources) -> InMemoryDataset:
    """Read every record, cluster and generated file of `sources` into memory; members
    without a record dropped, a member's row the first record with its id."""
    tables = []
    for f in sources.records:
        cols = [c for c in COLUMNS if c in pq.read_schema(f).names]
        tables.append(pq.read_table(f, columns=cols))
    records = pa.concat_tables(tables, promote_options="permissive")
    ids = records.column("id").combine_chunks()
    if sources.clusters:
        ctab = pa.concat_tables(
            pq.read_table(f, columns=["center", "member"]) for f in sources.clusters
        )
    else:
        ctab = pa.table({"center": ids, "member": ids})
    ctab = ctab.filter(pc.is_valid(pc.index_in(ctab.column("member"), value_set=ids)))
    index = ClusterIndex.from_table(ctab)
    rows = pc.index_in(index.members, value_set=ids).to_numpy().astype(np.int64)
    by_id: dict[str, list[str]] = {}
    for f in sources.generated:
        g = pq.read_table(f, columns=["id", "sequence"]).to_pydict()
        for rid, seq in zip(g["id"], g["sequence"], strict=True):
            by_id.setdefault(rid, []).append(seq)
    return InMemoryDataset(name, type, records, index, rows, by_id)
