"""`make lint`'s rules, run by `make test` too: CI fails on a test that sleeps instead of
waiting for what it asserts (ruff's banned-api rule TID251, see pyproject.toml)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUFF = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
if not RUFF:
    pytest.skip("needs ruff (the dev extra: make setup)", allow_module_level=True)


def _ruff(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [RUFF, "check", "--no-cache", *args],
        cwd=ROOT,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_tree_passes_ruff_check():
    r = _ruff(".")
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize(
    "source",
    ["import time\n\ntime.sleep(1)\n", "from time import sleep\n\nsleep(1)\n"],
    ids=["time.sleep", "from time import sleep"],
)
def test_a_sleep_in_a_test_is_refused(source):
    r = _ruff("--select", "TID251", "--stdin-filename", "tests/test_probe.py", "-", stdin=source)
    assert r.returncode == 1 and "tests.waiting.wait_for" in r.stdout, r.stdout + r.stderr


def test_sleep_is_allowed_outside_tests_and_in_the_waiting_helper():
    source = "import time\n\ntime.sleep(1)\n"
    for name in ("esm3/probe.py", "tests/waiting.py"):
        r = _ruff("--select", "TID251", "--stdin-filename", name, "-", stdin=source)
        assert r.returncode == 0, (name, r.stdout + r.stderr)
