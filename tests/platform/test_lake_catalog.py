import subprocess
import sys
import threading

import duckdb
import pyarrow.parquet as pq
import pytest

from esm3.metrics.catalog import SqlRefused, checked_table, connect, query, refresh_catalog_file
from esm3.metrics.lake import LakeWriter, lake_dir, write_rows
from esm3.metrics.schema import TABLES
from tests.waiting import wait_for


def test_every_contract_table_is_queryable_when_empty(workspace):
    for table in TABLES:
        df = query(workspace, f"SELECT * FROM {checked_table(table)}")  # noqa: S608 - schema name
        assert len(df) == 0
        # the view exposes the documented columns
        assert set(TABLES[table].names) <= set(df.columns), table


def test_rows_round_trip_and_unknown_columns_are_refused(workspace):
    write_rows(
        workspace,
        "rejects",
        [dict(run_id="r", stage="ingest", source="a.fa", record="7", reason="bad letter")],
    )
    df = query(workspace, "SELECT * FROM rejects")
    assert df.loc[0, "reason"] == "bad letter" and df.loc[0, "time"] is not None
    with pytest.raises(KeyError, match="no column"):
        write_rows(workspace, "rejects", [dict(run_id="r", colour="red")])
    with pytest.raises(KeyError, match="unknown table"):
        write_rows(workspace, "nope", [{}])


def test_files_appear_whole_under_their_final_name(workspace):
    path = write_rows(workspace, "events", [dict(run_id="r1", step=1, kind="checkpoint")])
    assert path.parent.name == "run_id=r1" and path.suffix == ".parquet"
    assert pq.read_table(path).num_rows == 1
    leftovers = [p for p in lake_dir(workspace).rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []


def test_latest_versions_win(workspace):
    base = dict(run_id="r", job_id="5_0", rank=0, attempt=0, stage="s")
    write_rows(workspace, "jobs", [dict(base, state="SUBMITTED")])
    write_rows(workspace, "jobs", [dict(base, state="RUNNING", node="node1")])
    write_rows(workspace, "jobs", [dict(base, state="COMPLETED", exit_code=0)])
    df = query(workspace, "SELECT state, exit_code FROM jobs")
    assert df.to_dict("records") == [{"state": "COMPLETED", "exit_code": 0}]
    assert len(query(workspace, "SELECT * FROM jobs_history")) == 3


def test_run_status_follows_its_jobs(workspace):
    write_rows(workspace, "runs", [dict(run_id="r", kind="demo", status="SUBMITTED")])
    for i in range(2):
        write_rows(
            workspace,
            "jobs",
            [dict(run_id="r", job_id=f"1_{i}", rank=0, attempt=0, state="RUNNING")],
        )
    assert query(workspace, "SELECT status FROM runs").status[0] == "RUNNING"
    write_rows(
        workspace, "jobs", [dict(run_id="r", job_id="1_0", rank=0, attempt=0, state="COMPLETED")]
    )
    write_rows(
        workspace, "jobs", [dict(run_id="r", job_id="1_1", rank=0, attempt=0, state="FAILED")]
    )
    assert query(workspace, "SELECT status FROM runs").status[0] == "FAILED"


def test_resumed_steps_keep_the_latest_attempt(workspace):
    write_rows(
        workspace, "train_steps", [dict(run_id="r", step=s, attempt=0, loss=1.0) for s in range(5)]
    )
    write_rows(
        workspace,
        "train_steps",
        [dict(run_id="r", step=s, attempt=1, loss=2.0) for s in range(3, 6)],
    )
    df = query(workspace, "SELECT step, loss FROM train_steps ORDER BY step")
    assert df.step.tolist() == [0, 1, 2, 3, 4, 5]
    assert df.loss.tolist() == [1, 1, 1, 2, 2, 2]


@pytest.mark.parametrize(
    "sql",
    [
        "CREATE TABLE x (a INT)",
        "INSERT INTO runs (run_id) VALUES ('x')",
        "COPY (SELECT 1) TO 'out.csv'",
        "ATTACH 'other.duckdb'",
        "DROP VIEW runs",
        "SELECT 1; DELETE FROM runs",
        "SET enable_external_access = true",
    ],
)
def test_writes_are_refused(workspace, sql):
    with pytest.raises(SqlRefused, match="refused|read-only"):
        query(workspace, sql)


def test_files_outside_the_lake_are_not_readable(workspace, tmp_path):
    secret = tmp_path / "secret.csv"
    secret.write_text("a\n1\n")
    for sql in (
        str(secret),
        "http://example.org/x.csv",
    ):
        with pytest.raises(duckdb.Error, match="disabled by configuration|Permission"):
            query(workspace, "SELECT * FROM read_csv(?)", [sql])


def test_reads_never_block_a_writer(workspace):
    """A reader holding a connection open while a writer appends: both proceed."""
    con = connect(workspace)
    n_before = con.execute("SELECT count(*) FROM train_steps").fetchone()[0]
    errors = []

    def writer():
        try:
            with LakeWriter(workspace, "train_steps", flush_rows=10, background=False) as w:
                for s in range(200):
                    w.add(dict(run_id="live", step=s, attempt=0, loss=1.0))
        except Exception as e:  # pragma: no cover - the assertion below reports it
            errors.append(e)

    t = threading.Thread(target=writer)
    t.start()
    counts = []
    while t.is_alive():
        counts.append(con.execute("SELECT count(*) FROM train_steps").fetchone()[0])
    t.join(timeout=30)
    assert not errors
    assert counts == sorted(counts)  # monotone: never a partial or vanished file
    assert con.execute("SELECT count(*) FROM train_steps").fetchone()[0] == n_before + 200


def test_catalog_file_for_any_duckdb_client_while_it_is_open(workspace):
    write_rows(workspace, "runs", [dict(run_id="r", kind="demo", status="COMPLETED")])
    path = refresh_catalog_file(workspace)
    # an external client holds the file open read-only in another process until told to stop
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import duckdb,sys; c=duckdb.connect(sys.argv[1], read_only=True); "
            "print(c.execute('select count(*) from runs').fetchone()[0], flush=True); "
            "sys.stdin.read()",
            str(path),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "1"

        errors: list[BaseException] = []

        def refresh_and_write() -> None:
            try:
                refresh_catalog_file(workspace)
                write_rows(workspace, "runs", [dict(run_id="r2", kind="demo", status="COMPLETED")])
            except BaseException as e:  # noqa: BLE001 - reported by the test
                errors.append(e)

        # never waits on the client's lock: both return while the client holds the file
        t = threading.Thread(target=refresh_and_write, daemon=True)
        t.start()
        wait_for(lambda: not t.is_alive(), 60, "the refresh and the write, file held open")
        assert not errors, errors
        assert holder.poll() is None  # the client held it open all along
        con = duckdb.connect(str(path), read_only=True)
        assert con.execute("SELECT count(*) FROM runs").fetchone()[0] == 2
        con.close()
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("damage", ["truncated", "garbage pages"])
def test_a_corrupt_file_is_skipped_and_named(workspace, damage):
    good = write_rows(workspace, "runs", [dict(run_id="ok", kind="demo", status="COMPLETED")])
    bad = write_rows(workspace, "runs", [dict(run_id=f"r{i}", kind="demo") for i in range(50)])
    raw = bad.read_bytes()
    if damage == "truncated":
        bad.write_bytes(raw[: len(raw) // 2])
    else:  # footer intact, data pages overwritten
        bad.write_bytes(raw[:4] + b"\xff" * (len(raw) - 2000) + raw[-(2000 - 4) :])
    reported = {}
    df = query(workspace, "SELECT run_id FROM runs", on_corrupt=reported.update)
    assert df.run_id.tolist() == ["ok"]
    assert list(reported) == [bad] and good not in reported
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "jobs.cli",
            "sql",
            "-w",
            str(workspace),
            "-f",
            "csv",
            "SELECT run_id FROM runs",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0 and r.stdout.splitlines() == ["run_id", "ok"]
    assert f"skipped corrupt lake file {bad}" in r.stderr


def test_compaction_keeps_every_row_in_one_file(workspace):
    from esm3.metrics.lake import compact

    for i in range(10):
        write_rows(workspace, "train_steps", [dict(run_id="c", step=i, attempt=0, loss=float(i))])
    write_rows(workspace, "train_steps", [dict(run_id="other", step=0, attempt=0, loss=1.0)])
    before = query(workspace, "SELECT * FROM train_steps ORDER BY run_id, step")
    assert compact(workspace, "train_steps", run_id="c") == 10
    folder = lake_dir(workspace) / "train_steps" / "run_id=c"
    assert len(list(folder.glob("part-*.parquet"))) == 1
    after = query(workspace, "SELECT * FROM train_steps ORDER BY run_id, step")
    assert after.equals(before)
    assert compact(workspace, "train_steps", run_id="c") == 0  # below min_files now
