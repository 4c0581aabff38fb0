"""Checkpoints that cannot poison a run, on real shards and real files: a shard overwritten
in place (same size) is refused by its content hash and the resume falls back; pruning
keeps the newest clean checkpoint through a non-finite streak, during which nothing is
saved; a checkpoint is declared only after its metrics and "saved" event are in the lake,
also when the training process is killed with SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from esm3.metrics.catalog import query
from esm3.train import checkpoint as ckpt
from esm3.train.data import load_datasets
from esm3.train.trainer import Sinks, build_model, train
from jobs.train.config import load_config
from tests.train.conftest import data_root, stop_after_calls, write_config
from tests.waiting import wait_for

ONE_STAGE = """
[[stages]]
name = "one"
steps = {steps}
context_length = 64
tracks = ["sequence"]
"""


pytestmark = pytest.mark.usefixtures("process_group")


def _run(cfg, ckdir, *, stop_after=None, max_steps=None, flush=None):
    rows, events = [], []
    sinks = Sinks(rows.append, events.append, flush or (lambda: None))
    res = train(
        cfg,
        load_datasets(cfg, data_root(cfg)),
        run_id="t",
        ckpt_dir=ckdir,
        sinks=sinks,
        should_stop=stop_after_calls(stop_after),
        max_steps=max_steps,
    )
    return res, rows, events


def _steps(ckdir) -> list[int]:
    return [s for s, _ in ckpt.list_checkpoints(ckdir)]


def _overwrite_tensor_bytes(folder: Path, n: int = 4096) -> str:
    """Overwrite `n` bytes in the middle of the largest tensor of `__0_0.distcp` with 0xFF
    (NaN as float32), in place: the file keeps its size and DCP's own metadata."""
    from torch.distributed.checkpoint import FileSystemReader

    meta = FileSystemReader(str(folder)).read_metadata()
    items = [s for s in meta.storage_data.values() if s.relative_path == "__0_0.distcp"]
    big = max(items, key=lambda s: s.length)
    n = min(n, big.length // 2)
    f = folder / big.relative_path
    size = f.stat().st_size
    with open(f, "r+b") as fh:
        fh.seek(big.offset + (big.length - n) // 2)
        fh.write(b"\xff" * n)
    assert f.stat().st_size == size
    return f.name


def test_shard_overwritten_in_place_is_refused_and_resume_matches(tmp_path, train_data):
    cfg = load_config(write_config(tmp_path / "c.toml", train_data, "[checkpoint]\nevery = 2"))
    ref, ref_rows, _ = _run(cfg, tmp_path / "ref")
    assert ref.status == "completed" and sorted(ref.losses) == list(range(1, 9))

    ck = tmp_path / "run"
    part, _, _ = _run(cfg, ck, stop_after=5)
    assert part.status == "preempted" and _steps(ck) == [2, 4, 5]
    bad = ck / "step_00000005"
    state = ckpt.read_state(bad)
    assert set(state["files"]) == {".metadata", "__0_0.distcp"} and state["clean"]
    name = _overwrite_tensor_bytes(bad)

    # DCP alone reads the damaged shard without complaint: only the hash tells
    model, _ = build_model(cfg, torch.device("cpu"))
    from torch.distributed.checkpoint import load as dcp_load
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    dcp_load({"model": get_model_state_dict(model)}, checkpoint_id=str(bad))
    with pytest.raises(ckpt.CheckpointCorrupt, match=r"__0_0\.distcp: content changed"):
        ckpt.verify(bad, state)

    rest, rows, ev = _run(cfg, ck)
    (refusal,) = [e for e in ev if e["kind"] == "checkpoint_corrupt"]
    assert "step_00000005" in refusal["message"] and name in refusal["message"]
    assert "content changed" in refusal["message"]
    assert rest.resumed_from == 4
    assert "content changed" in ckpt.refused(bad)  # later loads skip it without hashing
    assert [r["step"] for r in rows] == [5, 6, 7, 8]
    assert [r["loss"] for r in rows] == [r["loss"] for r in ref_rows[4:]]
    for s in (5, 6, 7, 8):
        assert rest.losses[s] == ref.losses[s], (s, rest.losses[s], ref.losses[s])


def test_missing_or_resized_files_are_named(tmp_path):
    d = tmp_path / "step_00000001"
    d.mkdir()
    (d / "a.distcp").write_bytes(b"x" * 10_000)
    (d / "b.distcp").write_bytes(b"y" * 100)
    files = ckpt.file_manifest(d)
    assert ckpt.check_files(d, files, sorted(files)) == []
    (d / "a.distcp").write_bytes(b"x" * 9_999)
    (d / "b.distcp").unlink()
    assert ckpt.check_files(d, files, sorted(files)) == [
        "a.distcp: size 9999 bytes, manifest says 10000",
        "b.distcp: missing",
    ]


def test_prune_plan_keeps_newest_good():
    assert ckpt.prune_plan([(2, True), (4, True), (6, True)], 2) == [2]
    assert ckpt.prune_plan([(2, True), (4, True), (6, False), (8, False)], 1) == [2, 6]
    assert ckpt.prune_plan([(2, False), (4, False)], 1) == [2]


def test_nonfinite_streak_saves_nothing_and_keeps_newest_clean(tmp_path, train_data):
    """data 4..6 are NaN: steps 5-7 skipped. keep = 1: checkpoint 4 (clean) survives the
    unclean 8; the save due at 6 (mid-streak) is not written; a clean 10 replaces both."""
    over = ["checkpoint.every=2", "checkpoint.keep=1", "stability.inject_nan=[4, 5, 6]"]
    cfg = load_config(
        write_config(tmp_path / "c.toml", train_data, stages=ONE_STAGE.format(steps=10)), over
    )
    ck = tmp_path / "ck"
    res, rows, ev = _run(cfg, ck, max_steps=9)
    assert res.step == 9 and [r["step"] for r in rows if r["skipped"]] == [5, 6, 7]
    assert [e["step"] for e in ev if e["kind"] == "checkpoint_skipped"] == [6]
    saved = [(e["step"], json.loads(e["detail"])["clean"]) for e in ev if e["kind"] == "checkpoint"]
    assert saved == [(2, True), (4, True), (8, False)]
    assert _steps(ck) == [4, 8]
    assert ckpt.is_clean(ckpt.read_state(ck / "step_00000004"))
    assert not ckpt.is_clean(ckpt.read_state(ck / "step_00000008"))

    res, _, _ = _run(cfg, ck)
    assert res.resumed_from == 8 and res.step == 10 and _steps(ck) == [10]


def test_streak_that_aborts_leaves_the_last_clean_checkpoint(tmp_path, train_data):
    """The operator's case: non-finite steps until the run stops. Nothing is saved or
    pruned during the streak, so the clean checkpoint before it is still there."""
    over = [
        "checkpoint.every=2",
        "checkpoint.keep=1",
        "stability.inject_nan=[4, 5, 6, 7, 8, 9]",
        "stability.max_nonfinite=3",
    ]
    cfg = load_config(
        write_config(tmp_path / "c.toml", train_data, stages=ONE_STAGE.format(steps=10)), over
    )
    ck = tmp_path / "ck"
    with pytest.raises(RuntimeError, match="training stopped at step 8: 4 consecutive"):
        _run(cfg, ck)
    assert _steps(ck) == [4]
    ckpt.verify(ck / "step_00000004", ckpt.read_state(ck / "step_00000004"))


@pytest.mark.parametrize("async_save", [False, True])
def test_metrics_and_saved_event_flushed_before_checkpoint_declared(
    tmp_path, train_data, async_save
):
    cfg = load_config(
        write_config(tmp_path / "c.toml", train_data, stages=ONE_STAGE.format(steps=6)),
        ["checkpoint.every=2", f"checkpoint.async_save={str(async_save).lower()}"],
    )
    ck = tmp_path / "ck"
    seen = []

    def flush():
        # what a flush would make durable, and whether the checkpoint is declared yet
        (saved,) = [e for e in events if e["kind"] == "checkpoint"][len(seen) :][:1]
        step = saved["step"]
        declared = (ckpt.step_dir(ck, step) / ckpt.STATE_FILE).exists()
        seen.append((step, max(r["step"] for r in rows), declared))

    rows, events = [], []
    res = train(
        cfg,
        load_datasets(cfg, data_root(cfg)),
        run_id="t",
        ckpt_dir=ck,
        sinks=Sinks(rows.append, events.append, flush),
    )
    assert res.status == "completed"
    # async saves are declared a step or more later: rows are then ahead, never behind
    assert [s for s, _, _ in seen] == [2, 4, 6]
    assert all(last >= s and not declared for s, last, declared in seen), seen
    if not async_save:
        assert [last for _, last, _ in seen] == [2, 4, 6]
    # each checkpoint's counts are those of its own step, even when written steps later
    for step, path in ckpt.list_checkpoints(ck):
        st = ckpt.read_state(path)
        assert sum(st["tokens_by_dataset"].values()) == st["tokens_seen"], (step, st)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_killed_run_keeps_metrics_of_every_declared_checkpoint(tmp_path, train_data, workspace):
    """`esm3 train` on the local profile; SIGKILL to the training process right after a
    checkpoint is declared. The lake holds every step up to the newest declared checkpoint
    and its "saved" event, and that checkpoint verifies."""
    conf = write_config(
        tmp_path / "c.toml",
        train_data,
        "[checkpoint]\nevery = 5",
        stages=ONE_STAGE.format(steps=400),
    )
    log = open(tmp_path / "cli.log", "wb")  # noqa: SIM115 - closed in finally
    cli = subprocess.Popen(
        [sys.executable, "-m", "jobs.cli", "train", "--config", str(conf), "-c", "local"]
        + ["--workspace", str(workspace)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    controller = task = None
    try:

        def job_pid():
            assert cli.poll() is None, (tmp_path / "cli.log").read_text()[-3000:]
            jobs = query(workspace, "SELECT run_id, job_id FROM jobs WHERE stage = ?", ["train"])
            return (jobs.run_id[0], int(jobs.job_id[0])) if len(jobs) else None

        run_id, controller = wait_for(job_pid, 120, "the train job to be submitted")
        ck = workspace / "runs" / run_id / "checkpoints"

        def first_declared():
            assert cli.poll() is None, (tmp_path / "cli.log").read_text()[-3000:]
            return (ckpt.step_dir(ck, 5) / ckpt.STATE_FILE).exists()

        wait_for(first_declared, 120, "checkpoint step 5 to be declared")
        children = Path(f"/proc/{controller}/task/{controller}/children").read_text().split()
        (task,) = [int(c) for c in children]
        os.kill(task, signal.SIGKILL)
        wait_for(lambda: not _alive(task), 30, f"the training process {task} to be gone")
    finally:
        for pid in (controller,):
            if pid is not None and _alive(pid):
                os.kill(pid, signal.SIGKILL)
        if cli.poll() is None:
            cli.kill()
        cli.wait(timeout=30)
        log.close()

    declared = _steps(ck)
    n = declared[-1]
    assert n >= 5
    ckpt.verify(ckpt.step_dir(ck, n), ckpt.read_state(ckpt.step_dir(ck, n)))
    steps = query(
        workspace, "SELECT DISTINCT step FROM train_steps WHERE run_id = ? ORDER BY step", [run_id]
    ).step.tolist()
    assert steps[:n] == list(range(1, n + 1)), (n, steps)
    saved = query(
        workspace,
        "SELECT step, message FROM events WHERE run_id = ? AND kind = ? ORDER BY step",
        [run_id, "checkpoint"],
    )
    assert n in saved.step.tolist(), (n, saved)
    assert f"saved step_{n:08d}" in " ".join(saved.message)
