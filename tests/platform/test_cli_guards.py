"""Values that cannot work are refused by the real `esm3` command before anything is
recorded (one line, exit 2, naming the bound), and its output can be cut short by a pipe
without a traceback."""

import shlex
import subprocess
import sys

import pytest

from esm3.metrics.catalog import query
from jobs.clusters import load_profile
from jobs.train.config import check_memory, load_config

STAGE_0 = "stages=[{{name='a', steps=2, context_length={}}}]"


def esm3(*args, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "jobs.cli", *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["optim.lr=-1"], "config key 'optim.lr': must be > 0, got -1.0"),
        (["optim.lr=nan"], "config key 'optim.lr': must be a finite number, got nan"),
        (["optim.lr=inf"], "config key 'optim.lr': must be a finite number, got inf"),
        (["optim.eps=0"], "config key 'optim.eps': must be > 0, got 0.0"),
        (["optim.beta2=1"], "config key 'optim.beta2': must be in [0, 1), got 1.0"),
        (["checkpoint.every=-5"], "config key 'checkpoint.every': must be >= 0, got -5"),
        (["log_every=0"], "config key 'log_every': must be >= 1, got 0"),
        (["stability.window=0"], "config key 'stability.window': must be >= 3, got 0"),
        (["data.prefetch=0"], "config key 'data.prefetch': must be >= 1, got 0"),
        (["--nodes", "0"], "--nodes must be >= 1, got 0"),
        (["--nodes", "-3"], "--nodes must be >= 1, got -3"),
        (["--tasks-per-node", "0"], "--tasks-per-node must be >= 1, got 0"),
        (["model.context_length=0"], "config key 'model.context_length': must be >= 3, got 0"),
        (["model.d_head=0"], "config key 'model.d_head': must be >= 1, got 0"),
        ([STAGE_0.format(0)], "config key 'stages[0].context_length': must be >= 3, got 0"),
        (
            [STAGE_0.format(1000)],
            "'stages[0].context_length': must be <= 256 (the model's context length), got 1000",
        ),
        (
            ["data.batch_size=1e12"],
            "config key 'data.batch_size': 1000000000000 samples of up to 256 tokens over 1 "
            "rank(s) need at least ",
        ),
        (
            ["-c", "site-example", "--config", "esm3_1.4b", f"data.batch_tokens={2**40}"],
            "more than the 80.0 GiB a rank has on profile 'site-example' (gpu_mem_gb",
        ),
        (
            ["data.batch_tokens=4096"],
            "config key 'data.batch_tokens': set exactly one of data.batch_size (samples per "
            "step) and data.batch_tokens (tokens per step), the other 0; got batch_size=8, "
            "batch_tokens=4096",
        ),
    ],
)
@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "submit"])
def test_bad_values_are_one_line_naming_the_bound(workspace, args, message, dry_run):
    flags = ["--dry-run"] if dry_run else ["--no-wait"]
    r = esm3("train", "-w", str(workspace), *flags, *args)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert lines[0].startswith("esm3 train: error: ")
    assert r.stdout == ""
    assert len(query(workspace, "SELECT * FROM runs")) == 0


def test_slurm_node_count_is_checked_before_any_action():
    r = esm3("slurm", "status", "--nodes", "0")  # status: nothing would start either way
    assert r.returncode == 2
    assert r.stderr.strip() == "esm3 slurm: error: --nodes must be >= 1, got 0"


def test_the_memory_check_passes_the_papers_config_on_its_cluster():
    """A lower bound, not a guess: ESM3 1.4B's 1,572,864 tokens (768 rows of 2048) per step
    over 4 x 8 GPUs fits."""
    cfg = load_config("esm3_1.4b")
    check_memory(cfg, load_profile("site-example"), world_size=32, tasks_per_node=8)
    assert cfg.min_step_bytes(32) < 16 * 2**30


@pytest.mark.parametrize(
    "args, cut",
    [
        (["-f", "table"], "head -1"),
        (["-f", "csv"], "head -1"),
        (["-f", "json"], "head -c 100"),
    ],
)
def test_output_cut_short_by_a_pipe_is_quiet(workspace, args, cut):
    # all 100,000 rows (over --max-rows' default): far more than a pipe holds, so the
    # reader is always gone before the command is done writing
    cmd = shlex.join(
        [sys.executable, "-m", "jobs.cli", "sql", "-w", str(workspace), "--max-rows", "200000"]
        + [*args, "SELECT * FROM range(100000)"]
    )
    r = subprocess.run(
        ["bash", "-c", f'{cmd} | {cut}; st=${{PIPESTATUS[0]}}; echo; echo "esm3 exit $st"'],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.stderr == "", r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[-1] == "esm3 exit 141", r.stdout[-300:]
    if cut == "head -1":
        assert lines[0].strip() == "range"  # the header: what head kept
