"""`make gpu-check` without a GPU: the skip line; the whole table on tiny models on the CPU,
in a Python where the suite's heavier dependencies cannot be imported (as on a bare CUDA
machine); rows for errors, missing backends, time-outs and the budget; wheels on sys.path."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

from jobs.gpucheck.__main__ import main, run_row
from jobs.gpucheck.rows import Mismatch, Unavailable
from jobs.gpucheck.table import Row, write
from jobs.gpucheck.wheels import add_wheels

ROOT = Path(__file__).resolve().parents[1]
# in the project's dependencies but absent from a bare CUDA machine's Python
BLOCKED = ("duckdb", "streamlit", "biotite", "pandas", "scipy", "submitit", "altair", "tqdm")
# None in sys.modules: `import x` raises ModuleNotFoundError and find_spec(x) is None
RUNNER = """
import json, sys
blocked = json.loads(sys.argv[1])
sys.modules.update(dict.fromkeys(blocked))
from jobs.gpucheck.__main__ import main
rc = main(sys.argv[2:])
loaded = sorted({m.split(".")[0] for m, mod in sys.modules.items() if mod is not None})
print("MODULES " + json.dumps(loaded))
sys.exit(rc)
"""
ROWS = [
    "reference: sdpa + torch linear",
    "attention sdpa flash kernel",
    "attention sdpa efficient kernel (packed)",
    "attention xformers (packed)",
    "linear TransformerEngine",
    "linear TransformerEngine FP8",
    "linear torchao float8",
    "FSDP2 BF16 training step (1 rank)",
    "tiny BF16",
    "tiny BF16 +AC",
    "tiny FP8 torchao",
    "tiny FP8 torchao +AC",
]


def test_without_cuda_it_prints_one_line_and_succeeds(capsys, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the check would run instead of skipping")
    assert main(["--out", str(tmp_path / "t.md")]) == 0
    out = capsys.readouterr().out
    assert out == f"gpu-check skipped: no CUDA device here (torch {torch.__version__})\n"
    assert not (tmp_path / "t.md").exists()


def test_cpu_run_prints_one_table_without_the_heavy_dependencies(tmp_path):
    """About 15 s on 2 cores: tiny models, every row."""
    out = tmp_path / "gpu-check.json"
    args = [json.dumps(BLOCKED), "--device", "cpu", "--tiny", "--out", str(out)]
    args += ["--wheels", str(tmp_path / "no-wheels")]
    p = subprocess.run([sys.executable, "-c", RUNNER, *args], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)  # fmt: skip
    assert p.returncode == 0, p.stdout + p.stderr
    modules = json.loads(p.stdout.rsplit("MODULES ", 1)[1])
    assert not set(BLOCKED) & set(modules)
    lines = p.stdout.splitlines()
    assert sum(line.startswith("check ") for line in lines) == 1  # one table, one header
    table = json.loads(out.read_text())
    rows = {r["check"]: r for r in table["rows"]}
    assert [r["check"] for r in table["rows"]] == ROWS
    for name in ROWS:  # every row printed once, in the table
        assert sum(line.split("  ")[0] == name for line in lines) == 1, name
    result = {name: r["result"] for name, r in rows.items()}
    assert result["reference: sdpa + torch linear"].startswith("ok reference")
    assert result["attention xformers (packed)"] == "unavailable: xformers runs on CUDA only"
    assert result["linear TransformerEngine FP8"] == (
        "unavailable: TransformerEngine runs on CUDA only"
    )
    for name in ("linear torchao float8", "tiny FP8 torchao", "tiny FP8 torchao +AC"):
        assert result[name].startswith("unavailable: "), result[name]
    for name in ("attention sdpa flash kernel", "attention sdpa efficient kernel (packed)"):
        assert result[name].startswith(("ok max|diff|", "unavailable: torch has no ")), result
    assert result["FSDP2 BF16 training step (1 rank)"].startswith("ok loss=")
    for name in ("tiny BF16", "tiny BF16 +AC"):
        assert result[name].startswith("ok 2 steps of 2x64 tokens")
        assert rows[name]["tokens_per_s"] > 0 and rows[name]["mfu"] is None  # no CPU peak
    assert table["meta"]["device"] == "cpu" and table["meta"]["wheels"] == "none"


def _row(fn, cap=30.0, deadline_in=600.0) -> Row:
    return run_row("r", fn, time.monotonic() + deadline_in, cap, torch.device("cpu"))


def _raise(e: Exception):
    def fn(_deadline):
        raise e

    return fn


def test_each_outcome_is_one_row_and_never_stops_the_run():
    assert _row(lambda d: Row("r", "ok fine")).result == "ok fine"
    assert _row(_raise(Unavailable("no such kernel"))).result == "unavailable: no such kernel"
    assert _row(_raise(Mismatch("rel=0.5"))).result == "FAIL: rel=0.5"
    bad = _row(_raise(RuntimeError("CUDA error: out of memory\nsecond line")))
    assert bad.result == "FAIL: RuntimeError: CUDA error: out of memory" and bad.failed
    assert _row(lambda d: Row("r", "ok"), deadline_in=5.0).result == "skipped: time budget"


def test_a_row_that_runs_past_its_cap_is_interrupted():
    def spin(_deadline):
        end = time.monotonic() + 30  # bounded: the alarm interrupts it long before
        while time.monotonic() < end:
            pass
        return Row("r", "ran to the end")

    assert _row(spin, cap=0.5).result == "FAIL: RowTimeout: timed out after 0 s"


def test_table_files_escape_pipes_and_keep_numbers(tmp_path):
    rows = [Row("a", "ok max|diff|=1e-03"), Row("b", "ok", 1234.5, 0.4123, 20.25)]
    write(tmp_path / "t.md", rows, {"device": "x"})
    md = (tmp_path / "t.md").read_text().splitlines()
    assert md[0] == "- device: x"
    assert md[-2:] == [
        "| a |  |  |  | ok max\\|diff\\|=1e-03 |",
        "| b | 1,234 | 41.2% | 20.2 | ok |",
    ]
    write(tmp_path / "t.json", rows, {"device": "x"})
    assert json.loads((tmp_path / "t.json").read_text())["rows"][1]["mfu"] == 0.4123


def test_wheels_in_the_folder_are_importable(tmp_path):
    folder = tmp_path / "wheels"
    folder.mkdir()
    with zipfile.ZipFile(folder / "gpucheck_probe-1.0-py3-none-any.whl", "w") as z:
        z.writestr("gpucheck_probe/__init__.py", "VALUE = 7\n")
        z.writestr("gpucheck_probe-1.0.dist-info/METADATA", "Name: gpucheck_probe\nVersion: 1.0\n")
    before = list(sys.path)
    try:
        assert add_wheels(folder) == ["gpucheck_probe-1.0-py3-none-any.whl"]
        import gpucheck_probe

        assert gpucheck_probe.VALUE == 7
    finally:
        sys.path[:] = before
        sys.modules.pop("gpucheck_probe", None)
    assert add_wheels(tmp_path / "absent") == []
