"""mmseqs2 clustering (linclust) and search, with exactly the paper's flags.

Every call goes through `esm3.tool.MMSEQS` (checks the program and its version, logs the
command line, raises `ToolError` with mmseqs' stderr). Results are Arrow tables / Parquet:
clusters as (level, representative, member), search hits with named columns. Identity is a
fraction in [0, 1] throughout (mmseqs' `fident`), never percent.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from esm3.data.fasta import write_fasta
from esm3.data.shards import is_done, write_table
from esm3.tool import MMSEQS

# paper, A.2.1: linclust flags; --min-seq-id is the clustering level
LINCLUST_FLAGS = ("--kmer-per-seq", "100", "--cluster-mode", "2", "--cov-mode", "1", "-c", "0.8")
# paper, A.2.1: validation purge search flags
SEARCH_FLAGS = (
    "--alignment-mode", "3", "-c", "0.8", "--cov-mode", "0", "--max-seqs", "300",
    "--max-accept", "3", "--start-sens", "2", "-s", "7", "--sens-steps", "3",
)  # fmt: skip
# mmseqs' default --format-output (BLAST-tab); fident is a fraction
SEARCH_COLUMNS = {
    "query": pa.string(),
    "target": pa.string(),
    "fident": pa.float64(),
    "alnlen": pa.int32(),
    "mismatch": pa.int32(),
    "gapopen": pa.int32(),
    "qstart": pa.int32(),
    "qend": pa.int32(),
    "tstart": pa.int32(),
    "tend": pa.int32(),
    "evalue": pa.float64(),
    "bits": pa.float64(),
}
CLUSTER_SCHEMA = pa.schema(
    [("level", pa.float64()), ("representative", pa.string()), ("member", pa.string())]
)
HITS_SCHEMA = pa.schema(list(SEARCH_COLUMNS.items()))


def linclust_args(level: float) -> list[str]:
    """The paper's linclust flags at clustering level `level` (min sequence identity, 0-1)."""
    if not 0.0 <= level <= 1.0:
        raise ValueError(f"clustering level {level} is not a fraction in [0, 1]")
    return [*LINCLUST_FLAGS, "--min-seq-id", f"{level:g}"]


def _resources(threads: int, split_memory_limit: str | None) -> list[str]:
    args = ["--threads", str(int(threads))]
    if split_memory_limit:
        args += ["--split-memory-limit", str(split_memory_limit)]
    return args


def read_cluster_tsv(path: str | Path, level: float) -> pa.Table:
    """mmseqs' `*_cluster.tsv` (representative TAB member) as a CLUSTER_SCHEMA table."""
    table = pacsv.read_csv(
        path,
        read_options=pacsv.ReadOptions(column_names=["representative", "member"]),
        parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False),
        convert_options=pacsv.ConvertOptions(
            column_types={"representative": pa.string(), "member": pa.string()}
        ),
    )
    return pa.table(
        {
            "level": pa.repeat(pa.scalar(level, pa.float64()), table.num_rows),
            "representative": table.column("representative"),
            "member": table.column("member"),
        },
        schema=CLUSTER_SCHEMA,
    )


def linclust(
    fasta: str | Path,
    level: float,
    work_dir: str | Path,
    *,
    threads: int = 1,
    split_memory_limit: str | None = None,
) -> pa.Table:
    """Cluster a FASTA file with `mmseqs easy-linclust` and the paper's flags at `level`.

    Returns (level, representative, member) rows, one per input sequence (a representative
    is its own member). Temporary files live under `work_dir` and are removed.
    Raises ToolError when mmseqs is missing or fails.
    """
    Path(work_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=work_dir, prefix="linclust-") as tmp:
        prefix = Path(tmp) / "clu"
        MMSEQS.run(
            [
                "easy-linclust",
                fasta,
                prefix,
                Path(tmp) / "tmp",
                *linclust_args(level),
                *_resources(threads, split_memory_limit),
            ]
        )
        return read_cluster_tsv(f"{prefix}_cluster.tsv", level)


def cluster_shards(
    shards: list[str | Path],
    out: str | Path,
    level: float,
    work_dir: str | Path,
    *,
    threads: int = 1,
    split_memory_limit: str | None = None,
) -> tuple[dict, list[dict]]:
    """One task: cluster the sequences of Parquet `shards` at `level` into Parquet `out`.

    Idempotent (skips when `out` exists); `out` appears only when complete.
    Returns (summary counts, reject rows: none at this stage).
    """
    out = Path(out)
    if is_done(out):
        table = pq.read_table(out, columns=["representative"])
        return _cluster_summary(out, level, table, skipped=True), []
    Path(work_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=work_dir, prefix="fasta-") as tmp:
        fasta = write_fasta(
            [pq.read_table(s, columns=["id", "sequence"]) for s in shards], Path(tmp) / "in.fasta"
        )
        table = linclust(
            fasta, level, work_dir, threads=threads, split_memory_limit=split_memory_limit
        )
    write_table(table, out)
    return _cluster_summary(out, level, table, skipped=False), []


def _cluster_summary(out: Path, level: float, table: pa.Table, skipped: bool) -> dict:
    return {
        "clusters_file": str(out),
        "level": level,
        "sequences": table.num_rows,
        "clusters": pc.count_distinct(table.column("representative")).as_py(),
        "skipped": skipped,
    }


def search(
    query: str | Path,
    target: str | Path,
    work_dir: str | Path,
    *,
    threads: int = 1,
    split_memory_limit: str | None = None,
) -> pa.Table:
    """`mmseqs easy-search` of query FASTA against target FASTA with the paper's purge flags.

    Returns hits with the columns of HITS_SCHEMA (`fident` is a fraction in [0, 1]).
    Raises ToolError when mmseqs is missing or fails.
    """
    Path(work_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=work_dir, prefix="search-") as tmp:
        hits = Path(tmp) / "hits.m8"
        MMSEQS.run(
            [
                "easy-search",
                query,
                target,
                hits,
                Path(tmp) / "tmp",
                *SEARCH_FLAGS,
                "--format-output",
                ",".join(SEARCH_COLUMNS),
                *_resources(threads, split_memory_limit),
            ]
        )
        if hits.stat().st_size == 0:
            return HITS_SCHEMA.empty_table()
        return pacsv.read_csv(
            hits,
            read_options=pacsv.ReadOptions(column_names=list(SEARCH_COLUMNS)),
            parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False),
            convert_options=pacsv.ConvertOptions(column_types=SEARCH_COLUMNS),
        ).cast(HITS_SCHEMA)
