"""`esm3 preprocess`: the pipelines as arrays on the local executor and on the real local
SLURM cluster, killed and resumed, with rejects and Table S3/S4 rows in the lake.

One uninterrupted run on `local` is the reference; the SLURM run is killed mid-way with
scancel, run again, and must end with the same files and numbers; the same for a local
structures run whose driver and jobs are SIGKILLed."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from esm3.data.structures.stages import structure_dataset_stats
from esm3.data.token_stats import cluster_table, dataset_stats_row, token_stats_row
from esm3.metrics.catalog import checked_table, query
from esm3.tokenize.annotations import read_vocabulary
from esm3.tokenize.function_tokens import FunctionFiles, FunctionTokenizer
from jobs.cli import main as cli_main
from jobs.clusters import load_profile
from jobs.preprocess import run_preprocess
from jobs.stages.config import load_config
from jobs.workspace import prepare
from tests.preprocess.conftest import write_config
from tests.waiting import wait_for

DATA = Path("data/preprocess/t")


def _stats(ws: Path, run_id: str, table: str) -> list[dict]:
    table = checked_table(table)  # an identifier: only names of the fixed schema
    df = query(ws, f"SELECT * EXCLUDE (run_id, computed_at) FROM {table} "  # noqa: S608 - checked
               "WHERE run_id = ? ORDER BY dataset", [run_id])  # fmt: skip
    rows = df.to_dict("records")
    # NaN != NaN: compare missing levels as None
    return [{k: None if isinstance(v, float) and math.isnan(v) else v for k, v in r.items()}
            for r in rows]  # fmt: skip


def _same_rows(a: list[dict], b: list[dict]) -> None:
    """Equal rows; floats to 1e-12 (DuckDB sums per cluster in a thread-dependent order)."""
    assert len(a) == len(b) and a and [sorted(r) for r in a] == [sorted(r) for r in b]
    for x, y in zip(a, b, strict=True):
        for k, v in x.items():
            assert v == (pytest.approx(y[k], rel=1e-12) if isinstance(v, float) else y[k]), k


def _snapshot(ws: Path, sub: str = "") -> dict[str, list[dict]]:
    """Every Parquet output of the config (paths relative; input paths dropped)."""
    root = ws / DATA
    out = {}
    for p in sorted((root / sub).rglob("*.parquet")):
        rel = str(p.relative_to(root))
        if "/tmp/" in rel or rel.endswith(".rejects.parquet"):
            continue
        t = pq.read_table(p)
        if "/level-" in rel:  # mmseqs writes the same clusters in a thread-dependent order
            t = t.sort_by([("representative", "ascending"), ("member", "ascending")])
        out[rel] = t.drop_columns([c for c in ("source", "offset") if c in t.column_names])
    return out


def _same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].equals(b[k]), f"{k} differs"


@pytest.fixture(scope="module")
def reference(inputs, tmp_path_factory):
    """One uninterrupted run of every pipeline on the local executor."""
    ws = prepare(tmp_path_factory.mktemp("ref") / "ws")
    cfg = write_config(ws.parent / "t.toml", inputs)
    res = run_preprocess(ws, load_profile("local"), cfg, "all", progress=False, timeout_s=600)
    return ws, cfg, res


# --- bad input: one line, nothing submitted --------------------------------------------------


def _cli(capsys, *argv: str) -> tuple[int, str]:
    rc = cli_main(["preprocess", *argv])
    return rc, capsys.readouterr().err


def test_missing_input_file_is_one_line_before_any_submission(inputs, workspace, capsys):
    cfg = write_config(workspace.parent / "t.toml", inputs)
    bad = cfg.read_text().replace(str(inputs["jgi"]), "/no/such/jgi.fasta")
    cfg.write_text(bad)
    rc, err = _cli(capsys, "sequences", "--config", str(cfg), "-w", str(workspace))
    assert rc == 2
    assert err.strip().count("\n") == 0
    assert "dataset 'jgi'" in err and "/no/such/jgi.fasta" in err and "does not exist" in err
    assert query(workspace, "SELECT count(*) AS n FROM runs").n[0] == 0
    assert query(workspace, "SELECT count(*) AS n FROM jobs").n[0] == 0
    assert not any((workspace / "logs" / "submitit").iterdir())


def test_unknown_dataset_type_and_bad_values_are_one_line(inputs, workspace, capsys):
    cfg = write_config(workspace.parent / "t.toml", inputs)
    rc, err = _cli(capsys, "all", "--config", str(cfg), "-w", str(workspace),
                   "datasets=[{name='x', type='protein', paths=['a.fa']}]")  # fmt: skip
    assert rc == 2 and err.strip().count("\n") == 0
    assert "'datasets[0].type'" in err and "'protein'" in err and "'structure'" in err
    rc, err = _cli(capsys, "sequences", "--config", str(cfg), "-w", str(workspace), "levels=3")
    assert rc == 2 and "unknown config key 'levels'" in err
    text = cfg.read_text().replace('format = "afdb"', 'format = "fasta"')
    cfg.write_text(text)
    rc, err = _cli(capsys, "structures", "--config", str(cfg), "-w", str(workspace))
    assert rc == 2 and "dataset 'afdb'" in err and "format 'fasta'" in err
    assert query(workspace, "SELECT count(*) AS n FROM runs").n[0] == 0


def test_demo_config_loads_and_its_inputs_resolve(tmp_path):
    from jobs.stages.config import check_inputs

    cfg = load_config(None)
    assert cfg.name == "demo" and {d.name for d in cfg.datasets} >= {"uniref", "pdb", "afdb"}
    uniref = next(d for d in cfg.datasets if d.name == "uniref")
    assert uniref.levels == [0.7, 0.9]
    try:
        found = check_inputs(cfg, tmp_path, {"sequences", "structures"})
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"demo inputs not installed here: {e}")
    assert len(found.patterns["pdb"]) == 11  # inventoried by the `list` stage
    site = load_config(Path("jobs/configs/preprocess/site-example.toml"))
    levels = {d.name: d.levels for d in site.datasets}
    assert levels["uniref"] == [0.7, 0.9] and levels["jgi"] == [0.7] and levels["oas"] == [0.95]
    assert site.purge.validation_size == 25_000 and site.codebook.size == 4096


# --- the reference run on local ------------------------------------------------------------


def test_local_run_completes_every_stage_and_records_its_jobs(reference):
    ws, _, res = reference
    runs = query(ws, "SELECT status, kind FROM runs WHERE run_id = ?", [res.run_id])
    assert runs.to_dict("records") == [{"status": "COMPLETED", "kind": "preprocess"}]
    jobs = query(ws, "SELECT stage, count(*) AS n, bool_and(state = 'COMPLETED') AS ok "
                 "FROM jobs WHERE run_id = ? GROUP BY stage", [res.run_id])  # fmt: skip
    tasks = dict(zip(jobs.stage, jobs.n, strict=True))
    assert jobs.ok.all()
    # uniref is split in 2, jgi is 1 shard; one cluster task per dataset (all its levels)
    assert tasks["split"] == 1 and tasks["ingest"] == 3 and tasks["purge"] == 3
    assert tasks["cluster"] == 2 and tasks["expand"] == 2
    assert tasks["structures"] == 4 and tasks["structure-cluster"] == 2
    assert tasks["tokenize"] == 4 and tasks["codebook"] == 1 and tasks["derive"] == 1


def test_every_dataset_gets_a_training_store_named_by_the_manifest(reference):
    """The last stage writes each dataset's store from the shards and clusters the manifest
    lists; training opens it by `config:dataset`."""
    from esm3.data.store import open_store
    from esm3.train.config import DatasetSpec
    from esm3.train.data import load_dataset

    ws, cfg, res = reference
    name = load_config(cfg).name
    manifest = json.loads((ws / "data" / "preprocess" / name / "manifest.json").read_text())
    assert res.results["store"] and len(res.results["store"]) == len(manifest["datasets"])
    for ds, entry in manifest["datasets"].items():
        store = open_store(entry["store"])
        rows = sum(pq.read_metadata(p).num_rows for p in entry["shards"])
        assert (store.type, len(store)) == (entry["type"], rows), ds
        assert (Path(entry["store"]) / "codebook.npz").exists() == (entry["type"] == "structure")
        assert (Path(entry["store"]) / "vocab.json").read_text() == Path(
            manifest["vocabulary"]
        ).read_text()
        assert "annotations" in store.meta["columns"]
        spec = DatasetSpec(name=ds, type=entry["type"], source=f"{name}:{ds}")
        loaded = load_dataset(spec, ws / "data")
        assert loaded.protein(int(loaded.member_rows[0])).sequence


def test_sequence_records_carry_labels_and_the_manifest_names_the_vocabulary(reference):
    ws, _, res = reference
    root = ws / DATA
    manifest = json.loads((root / "manifest.json").read_text())
    vocab = read_vocabulary(manifest["vocabulary"])
    assert manifest["vocabulary"] == str(root / "vocabulary.json")
    assert vocab.residue_labels == ("PS00004", "PS00016", "PS00017")  # every site, min 1 protein
    assert vocab.function_files == FunctionFiles.in_folder(root / "function-tokens")
    entries = FunctionTokenizer.from_files(vocab.function_files).entries
    assert len(entries) == 11472 and all(f >= "IPR900000" for f in entries)  # every family
    jobs = query(ws, "SELECT count(*) AS n FROM jobs WHERE run_id = ? AND stage = 'annotate'",
                 [res.run_id])  # fmt: skip
    assert jobs.n[0] == 3  # one task per final shard: uniref's 2, jgi's 1
    for name in ("uniref", "jgi"):
        shards = manifest["datasets"][name]["shards"]
        assert shards and all("/annotated/" in s and Path(s).exists() for s in shards)
        t = pa.concat_tables(pq.read_table(s) for s in shards)
        purged = [pq.read_table(s.replace("/annotated/", "/purged/"), columns=["id"])
                  for s in shards]  # fmt: skip
        assert t.column("id").to_pylist() == [i for p in purged for i in p["id"].to_pylist()]
        # the stand-in gives every mmseqs2-examples sequence a family label, whole length
        assert t.column("annotations").null_count == 0
        for n, anns in zip(t["length"].to_pylist(), t["annotations"].to_pylist(), strict=True):
            assert anns == [{"ipr": anns[0]["ipr"], "start": 1, "end": n}]
        sites = [a for x in t["residue_annotations"].to_pylist() if x for a in x]
        assert sites and all(1 <= a["start"] <= a["end"] for a in sites)


def test_rejects_land_with_the_run_id(reference):
    ws, _, res = reference
    rej = query(ws, "SELECT stage, record, reason, detail, source FROM rejects "
                "WHERE run_id = ?", [res.run_id])  # fmt: skip
    by = {(r.stage, r.record): r for r in rej.itertuples()}
    assert by[("ingest", "ZZBAD1")].reason == "invalid_characters"
    assert "'J'" in by[("ingest", "ZZBAD1")].detail
    assert by[("ingest", "ZZBAD2")].reason == "empty_sequence"
    assert [r.reason for r in rej.itertuples() if r.reason == "duplicate_id"] == ["duplicate_id"]
    assert by[("structures", "7ETN")].reason == "deposited_after"
    assert by[("structures", "EMPTY.cif")].reason == "empty"
    # 1YJP (7 residues) cannot have 0.5 L long-range contacts: the AFDB filter refuses it
    assert by[("structures", "1YJP_A")].reason == "contacts"
    ingest_rejects = sum(r["rejected"] for r in res.results["ingest"])
    assert (rej.stage == "ingest").sum() == ingest_rejects == 3
    purge = rej[rej.stage == "purge"]
    assert len(purge) == sum(r["blacklisted"] for r in res.results["purge"])
    assert set(purge.reason) <= {"validation_hit"}


def test_stats_rows_match_the_library(reference):
    ws, _, res = reference
    root = ws / DATA
    s3 = {r["dataset"]: r for r in _stats(ws, res.run_id, "dataset_stats")}
    s4 = {r["dataset"]: r for r in _stats(ws, res.run_id, "token_stats")}
    assert set(s3) == {"uniref", "jgi", "pdb", "pdb_clustered", "afdb"}
    assert set(s4) == {"uniref", "jgi", "pdb", "afdb"}
    budgets = {"uniref": 2_000_000, "jgi": 1_000_000, "pdb": 1_000_000, "afdb": 1_000_000}
    for name, levels in (("uniref", (0.7, 0.9)), ("jgi", (0.7, None))):
        shards = sorted(str(p) for p in (root / "sequences" / name / "purged").glob("*.parquet"))
        final = root / "clusters" / name / "final.parquet"
        ct = cluster_table(str(final), shards)
        want = dataset_stats_row(dataset=name, type="sequence", clustering_level=levels[0],
                                 expansion_level=levels[1], n=ct["n"], tokens=ct["tokens"],
                                 release="test")  # fmt: skip
        for k in ("clustering_count", "expansion_count", "sequences", "tokens"):
            got = s3[name][k]
            assert (got is None or (isinstance(got, float) and math.isnan(got))) if want[k] is None \
                else got == want[k], (name, k)  # fmt: skip
        assert s3[name]["tokens"] == pq.read_table(shards, columns=["length"])["length"].to_numpy(
        ).sum() - _not_in_clusters(final, shards)  # fmt: skip
        w4 = token_stats_row(dataset=name, type="sequence", n=ct["n"], tokens=ct["tokens"],
                             token_budget=budgets[name])  # fmt: skip
        assert s4[name]["token_budget"] == budgets[name]
        for k in ("repeats", "unique_samples", "unique_tokens"):
            assert s4[name][k] == pytest.approx(w4[k], rel=1e-12)
        # Table S4 by hand: sum over clusters of n (1 - (1 - 1/n)^k)
        k = w4["repeats"]
        n = ct["n"].astype(float)
        assert s4[name]["unique_samples"] == pytest.approx((n * (1 - (1 - 1 / n) ** k)).sum())
    pdb = sorted(str(p) for p in (root / "structures" / "pdb" / "shards").glob("*.parquet"))
    assert s3["pdb"]["sequences"] == structure_dataset_stats(pdb, "pdb", "test")["sequences"]
    ids = pq.read_table(pdb, columns=["id"])["id"].to_pylist()
    assert sorted(ids) == ["1YJP_A", "5PTI_A"]  # 7ETN and the empty file are refused
    assert s3["pdb"]["clustering_count"] is None or math.isnan(s3["pdb"]["clustering_count"])
    assert s3["pdb_clustered"]["clustering_count"] == 2  # two unrelated chains
    assert s3["pdb_clustered"]["clustering_level"] == 0.7
    assert s3["pdb_clustered"]["expansion_level"] == 1.0


def _not_in_clusters(final: Path, shards: list[str]) -> int:
    """Residues of training sequences that the cap of 20 left out of the final clusters."""
    members = set(pq.read_table(final, columns=["member"])["member"].to_pylist())
    t = pq.read_table(shards, columns=["id", "length"])
    keep = np.array([i not in members for i in t["id"].to_pylist()])
    return int(t["length"].to_numpy()[keep].sum())


# --- SLURM: the whole graph as arrays with dependencies, killed and resumed -----------------


def _wait_for(ws: Path, sql: str, timeout: float) -> None:
    """Until the count that `sql` selects as `n` is positive."""
    wait_for(
        lambda: query(ws, sql).n[0] > 0, timeout, f"a positive count from: {sql}", interval=0.5
    )


def _run_id(ws: Path) -> str:
    return query(ws, "SELECT run_id FROM runs ORDER BY submitted_at DESC LIMIT 1").run_id[0]


@pytest.mark.slurm
def test_slurm_killed_mid_way_and_resumed_ends_like_the_uninterrupted_run(
    slurm_cluster, reference, tmp_path
):
    ref_ws, cfg, ref = reference
    ws = prepare(tmp_path / "ws")
    env = {**os.environ, **slurm_cluster.env()}
    cmd = [sys.executable, "-m", "jobs.cli", "preprocess", "all", "--config", str(cfg),
           "-w", str(ws), "-c", "slurm-local"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # every stage is queued at once; kill it all once the whole ingest array is done
        # (each of its tasks, as many as the reference ran: the resume must skip them all)
        tasks = query(ref_ws, "SELECT count(*) AS n FROM jobs WHERE stage = 'ingest' "
                      "AND run_id = ?", [ref.run_id]).n[0]  # fmt: skip
        wait_for(
            lambda: query(ws, "SELECT count(*) AS n FROM jobs WHERE stage = 'ingest' "
                          "AND state = 'COMPLETED'").n[0] == tasks,
            180,
            f"all {tasks} ingest tasks COMPLETED",
            interval=0.5,
        )  # fmt: skip
        first = _run_id(ws)
        ids = query(ws, "SELECT DISTINCT split_part(job_id, '_', 1) AS j FROM jobs "
                    "WHERE run_id = ?", [first]).j.tolist()  # fmt: skip
        subprocess.run(["scancel", *ids], env=env, check=True)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, err
    assert "job failed" in err and "CANCELLED" in err
    stats = query(ws, "SELECT count(*) AS n FROM dataset_stats WHERE run_id = ?", [first])
    assert stats.n[0] == 0  # it stopped before the end
    # its jobs were cancelled: so is the run
    assert query(ws, "SELECT status FROM runs WHERE run_id = ?", [first]).status[0] == "CANCELLED"

    res = run_preprocess(ws, load_profile("slurm-local"), cfg, "all", progress=False,
                         timeout_s=600)  # fmt: skip
    _same(_snapshot(ws), _snapshot(ref_ws))
    _same_rows(_stats(ws, res.run_id, "dataset_stats"), _stats(ref_ws, ref.run_id, "dataset_stats"))
    _same_rows(_stats(ws, res.run_id, "token_stats"), _stats(ref_ws, ref.run_id, "token_stats"))
    jobs = query(ws, "SELECT stage, job_id, node, state FROM jobs WHERE run_id = ?", [res.run_id])
    assert set(jobs.state) == {"COMPLETED"}
    multi = jobs.stage.isin(["ingest", "purge", "structures", "tokenize", "cluster", "expand"])
    assert jobs[multi].job_id.str.fullmatch(r"\d+_\d+").all()  # array tasks
    assert jobs.job_id.str.fullmatch(r"\d+(_\d+)?").all()  # 1-task arrays: a plain id
    assert set(jobs.node) <= {"node1", "node2"}
    # the resumed run found the ingest shards done
    assert all(r["skipped"] for r in res.results["ingest"])
    # and recorded their rejects again under its own run id
    n = query(ws, "SELECT count(*) AS n FROM rejects WHERE run_id = ? "
              "AND stage = 'ingest'", [res.run_id]).n[0]  # fmt: skip
    assert n == 3


# --- local: a structures run SIGKILLed with its jobs, then resumed ---------------------------


def test_local_structures_killed_and_resumed(reference, tmp_path):
    ref_ws, cfg, _ = reference
    ws = prepare(tmp_path / "ws")
    cmd = [sys.executable, "-m", "jobs.cli", "preprocess", "structures", "--config", str(cfg),
           "-w", str(ws), "-c", "local"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # fmt: skip
    try:
        _wait_for(ws, "SELECT count(*) AS n FROM jobs WHERE stage = 'structures' "
                  "AND state = 'COMPLETED'", 180)  # fmt: skip
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        # local jobs are the controller processes named by job_id, and their children
        for pid in query(ws, "SELECT DISTINCT job_id FROM jobs").job_id:
            subprocess.run(["pkill", "-KILL", "-P", pid], check=False)
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
    first = _run_id(ws)
    assert query(ws, "SELECT count(*) AS n FROM dataset_stats WHERE run_id = ?", [first]).n[0] == 0
    done_before = len(list((ws / DATA / "structures" / "pdb" / "shards").glob("*.parquet"))) + len(
        list((ws / DATA / "structures" / "afdb" / "shards").glob("*.parquet"))
    )
    assert 1 <= done_before <= 4
    res = run_preprocess(ws, load_profile("local"), cfg, "structures", progress=False,
                         timeout_s=600)  # fmt: skip
    skipped = sum(1 for r in res.results["structures"] if r.get("skipped"))
    assert skipped >= done_before - 1  # a shard may have landed while the kill went out
    for sub in ("structures", "clusters/pdb", "clusters/afdb"):
        mine = {k: v for k, v in _snapshot(ws, sub).items() if "/tokens/" not in k}
        ref = {k: v for k, v in _snapshot(ref_ws, sub).items() if "/tokens/" not in k}
        _same(mine, ref)
    want = [
        r for r in _stats(ref_ws, _ref_run(ref_ws), "dataset_stats") if r["type"] == "structure"
    ]
    _same_rows(_stats(ws, res.run_id, "dataset_stats"), want)
    # a second run finds everything done and records the same numbers again
    again = run_preprocess(ws, load_profile("local"), cfg, "structures", progress=False)
    assert all(r.get("skipped") for r in again.results["structures"])
    _same_rows(_stats(ws, again.run_id, "dataset_stats"), want)


def _ref_run(ws: Path) -> str:
    return query(ws, "SELECT run_id FROM runs WHERE status = 'COMPLETED' LIMIT 1").run_id[0]
