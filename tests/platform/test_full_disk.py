"""A full disk, for real: a 4 MB tmpfs filled to the last byte. The lake writer fails naming
the file and leaves no `.tmp` part; `esm3 preprocess` and `esm3 train` say "no space left
on device" and the path in one line, without a traceback; a checkpoint save that fails
leaves no partial `step_*` folder."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from esm3.metrics.lake import write_rows
from jobs.workspace import prepare
from tests.train.fixtures import sequence_shard

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")


@pytest.fixture
def disk(tmp_path):
    """A 4 MB tmpfs, unmounted afterwards."""
    d = tmp_path / "disk"
    d.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(d)],
                       capture_output=True, text=True)  # fmt: skip
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield d
    finally:
        if subprocess.run(["umount", str(d)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(d)], check=True)


def _fill(d: Path, leave: int = 0) -> None:
    """Take every free byte of the file system holding `d`, then give back `leave` bytes
    (a page or more lets the workspace's write probe pass: the failure comes later)."""
    with open(d / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC
        f.truncate(max(f.tell() - leave, 0))


def _leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(".tmp") or p.name.startswith("step_")]


def _one_line_no_space(r: subprocess.CompletedProcess, command: str, disk: Path) -> None:
    """Non-zero, no traceback, one line naming a path on the full disk and the cause."""
    assert r.returncode != 0, r.stdout + r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    line = r.stderr.strip()
    assert "\n" not in line, r.stderr
    assert line.startswith(f"esm3 {command}: error: ") and str(disk) in line, line
    assert "no space left on device" in line.lower(), line


def test_lake_writer_on_a_full_disk_names_the_file_and_leaves_no_tmp(disk):
    ws = prepare(disk / "ws")
    _fill(disk)
    rows = [dict(run_id="r", step=i, kind="k", message="m" * 200) for i in range(2000)]
    with pytest.raises(OSError) as e:
        write_rows(ws, "events", rows)
    assert e.value.errno == errno.ENOSPC
    assert str(e.value.filename).startswith(str(ws / "lake" / "events"))
    assert _leftovers(ws) == []


@pytest.mark.parametrize("leave", [0, 4096, 16384], ids=["full", "1-page-left", "4-pages-left"])
def test_preprocess_on_a_full_disk_is_one_line(disk, tmp_path, leave):
    ws = prepare(disk / "ws")
    fasta = tmp_path / "u.fasta"
    fasta.write_text(">a\nMKTAYIAKQRQISFVKSHFSRQ\n>b\nMKVLAAGIVGLLLAQPAMA\n")
    cfg = tmp_path / "p.toml"
    cfg.write_text(f"""
name = "full"
[[datasets]]
name = "u"
type = "sequence"
paths = ["{fasta}"]
levels = [0.7]
""")
    _fill(disk, leave)
    r = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "preprocess", "sequences", "--config", str(cfg),
         "-w", str(ws), "-c", "local"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    _one_line_no_space(r, "preprocess", disk)
    assert _leftovers(ws) == []


@pytest.mark.parametrize("leave", [0, 4096, 16384], ids=["full", "1-page-left", "4-pages-left"])
def test_train_submitter_on_a_full_disk_is_one_line(disk, tmp_path, leave):
    ws = prepare(disk / "ws")
    shard = sequence_shard(tmp_path / "data", n=50, max_len=100)
    cfg = tmp_path / "train.toml"
    cfg.write_text(f"""
name = "full"
[model]
preset = "tiny"
d_model = 64
n_layers = 2
d_head = 32
context_length = 64
[data]
batch_size = 2
workers = 0
[[data.datasets]]
name = "uniprot"
type = "sequence"
shards = ["{shard}"]
[[stages]]
name = "seq"
steps = 2
context_length = 64
tracks = ["sequence"]
""")
    _fill(disk, leave)
    r = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "train", "--config", str(cfg), "-w", str(ws),
         "-c", "local", "--no-wait"],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    _one_line_no_space(r, "train", disk)
    assert _leftovers(ws) == []


def test_checkpoint_save_on_a_full_disk_leaves_no_partial_step_folder(disk):
    import torch

    from esm3.train import checkpoint as ckpt

    model = torch.nn.Linear(1500, 1500)  # 9 MB of weights: more than the disk holds
    # DCP reports the short write as its own error (torch's zip writer hides the errno)
    with pytest.raises(BaseException):  # noqa: B017 - CheckpointException is a BaseException
        ckpt.save(disk / "ckpt", 10, model, None, {"clean": True})
    assert _leftovers(disk) == []
