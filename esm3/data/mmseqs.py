"""mmseqs2 clustering (linclust) and search, with exactly the paper's flags.

Every call goes through `esm3.tool.MMSEQS` (checks the program and its version, logs the
command line, raises `ToolError` with mmseqs' stderr). Results are Arrow tables / Parquet:
clusters as (level, representative, member), search hits with named columns. Identity is a
fraction in [0, 1] throughout (mmseqs' `fident`), never percent.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from esm3.data.duck import connect
from esm3.data.fasta import fasta_bytes
from esm3.data.shards import COMPRESSION, atomic_path, is_done, sql_path, streamed, write_table
from esm3.tool import MMSEQS

# paper, A.2.1: linclust flags; --min-seq-id is the clustering level
LINCLUST_FLAGS = ("--kmer-per-seq", "100", "--cluster-mode", "2", "--cov-mode", "1", "-c", "0.8")
# protein database with keys in input order (--shuffle 0): the order easy-linclust's
# soft-linked database has, so the cluster files equal easy-linclust's byte for byte
CREATEDB_FLAGS = ("--dbtype", "1", "--shuffle", "0", "--write-lookup", "0")
ROW_GROUP_SIZE = 1 << 17  # as `write_table`
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


def cluster_shards(
    shards: list[str | Path],
    outs: Mapping[float, str | Path],
    work_dir: str | Path,
    *,
    threads: int = 1,
    split_memory_limit: str | None = None,
    memory_limit: str | None = None,
    runner: str | None = None,
    batch_rows: int = 1 << 16,
) -> list[dict]:
    """One task: cluster the sequences (id, sequence) of Parquet `shards` at every level of
    `outs` (level -> Parquet file of CLUSTER_SCHEMA rows), one summary per level.

    The shards are streamed into one mmseqs database (`createdb`, once) that every level's
    `linclust` reuses; `createtsv`'s file goes to Parquet through DuckDB (`memory_limit`),
    so no step holds the dataset in Python. The files equal `mmseqs easy-linclust` run on
    the same sequences (row for row with one thread; with more, mmseqs writes the same
    pairs in an order that varies from run to run, easy-linclust as well). Scratch (database, mmseqs' temporary files, the TSV) lives under
    `work_dir`, meant to be node-local, and is removed. `runner`: an MPI command (mmseqs'
    RUNNER, e.g. "mpirun -np 4") for the steps that can use it. Idempotent: levels whose
    file exists are skipped; a file appears only when complete.
    """
    todo = {lv: Path(o) for lv, o in outs.items() if not is_done(o)}
    limits = dict(threads=threads, memory_limit=memory_limit)
    if todo and not sum(pq.read_metadata(s).num_rows for s in shards):
        for out in todo.values():  # mmseqs refuses empty input
            write_table(CLUSTER_SCHEMA.empty_table(), out)
    elif todo:
        run = dict(threads=threads, split_memory_limit=split_memory_limit, runner=runner)
        _cluster_levels(shards, todo, work_dir, batch_rows, run, limits)
    con = connect(**limits, temp_dir=Path(work_dir))
    try:
        return [
            cluster_summary(con, Path(out), lv, skipped=lv not in todo) for lv, out in outs.items()
        ]
    finally:
        con.close()


def _cluster_levels(
    shards: list[str | Path],
    todo: dict[float, Path],
    work_dir: str | Path,
    batch_rows: int,
    run: dict,
    limits: dict,
) -> None:
    """createdb once, then linclust + createtsv + Parquet per level, in a scratch folder."""
    Path(work_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=work_dir, prefix="linclust-") as tmp:
        db = Path(tmp) / "db"
        createdb(shards, db, batch_rows=batch_rows)
        con = connect(**limits, temp_dir=Path(tmp) / "duckdb")
        try:
            for level, out in todo.items():
                tsv = linclust_db(db, level, Path(tmp) / f"level-{level:g}", **run)
                tsv_to_parquet(con, tsv, level, out)
                tsv.unlink()  # scratch space for the next level
        finally:
            con.close()


def createdb(shards: list[str | Path], db: str | Path, *, batch_rows: int = 1 << 16) -> None:
    """An mmseqs sequence database of the shards' (id, sequence) rows in shard order, fed
    to `createdb stdin` one batch of `batch_rows` at a time."""
    batches = (
        fasta_bytes(batch)
        for s in shards
        for batch in streamed(s).iter_batches(batch_rows, columns=["id", "sequence"])
    )
    MMSEQS.feed(["createdb", "stdin", db, *CREATEDB_FLAGS], batches)


def linclust_db(
    db: str | Path,
    level: float,
    work_dir: str | Path,
    *,
    threads: int = 1,
    split_memory_limit: str | None = None,
    runner: str | None = None,
) -> Path:
    """`mmseqs linclust` of database `db` with the paper's flags at `level`, then
    `createtsv`; returns the TSV (representative TAB member, a representative is its own
    member) written in `work_dir`, which holds the run's other files too."""
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    clu, tsv = work / "clu", work / "cluster.tsv"
    mpi = ["--mpi-runner", runner] if runner else []
    MMSEQS.run(
        [
            "linclust", db, clu, work / "tmp", *linclust_args(level),
            *_resources(threads, split_memory_limit), "--remove-tmp-files", "1", *mpi,
        ]
    )  # fmt: skip
    MMSEQS.run(["createtsv", db, db, clu, tsv, "--threads", str(int(threads))])
    return tsv


def tsv_to_parquet(
    con: duckdb.DuckDBPyConnection, tsv: str | Path, level: float, out: Path
) -> None:
    """Stream createtsv's file into Parquet `out` (CLUSTER_SCHEMA, the file's row order)."""
    with atomic_path(out) as tmp:
        # COPY's target cannot be bound: it goes in as a quoted literal (sql_path).
        # The CASE keeps `level` nullable as in CLUSTER_SCHEMA (a bare constant is written
        # as a required column).
        con.execute(
            f"""COPY (
                  SELECT CAST(CASE WHEN member IS NULL THEN NULL ELSE ? END AS DOUBLE) AS level,
                         representative, member
                  FROM read_csv(?, delim = '\t', header = false, quote = '', escape = '',
                                auto_detect = false,
                                columns = {{'representative': 'VARCHAR', 'member': 'VARCHAR'}}))
                TO {sql_path(tmp)}
                (FORMAT parquet, COMPRESSION {COMPRESSION}, ROW_GROUP_SIZE {ROW_GROUP_SIZE})""",  # noqa: S608
            [level, str(tsv)],
        )


def cluster_summary(con: duckdb.DuckDBPyConnection, out: Path, level: float, skipped: bool) -> dict:
    """Counts of a cluster file; a cluster is counted by its representative's own row, so
    the count streams (no set of representatives)."""
    sequences, clusters = con.execute(
        """SELECT count(*), count(*) FILTER (WHERE representative = member)
           FROM read_parquet(?)""",
        [str(out)],
    ).fetchone()
    return {
        "clusters_file": str(out),
        "level": level,
        "sequences": sequences,
        "clusters": clusters,
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
