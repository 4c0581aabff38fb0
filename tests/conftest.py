"""Shared fixtures. Tests that need something absent (SLURM, GPU, browser) are skipped
with the reason printed, never silently passed."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    from jobs.workspace import prepare

    return prepare(tmp_path / "ws")


@pytest.fixture(scope="session")
def slurm_cluster():
    """The local SLURM cluster of `esm3 slurm up` (make test starts it)."""
    from jobs import slurm_local

    if not shutil.which("sbatch"):
        pytest.skip("SLURM is not installed (make setup installs slurm-wlm)")
    c = slurm_local.LocalCluster(slurm_local.state_dir())
    if not slurm_local.sinfo_states(c):
        pytest.skip("the local SLURM cluster is not running (make slurm-up)")
    return c


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium (skips the test where Chromium or selenium is missing)."""
    from tests.browser import chromium

    with chromium() as driver:
        yield driver


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    no_browser = pytest.mark.skip(reason="needs Debian's chromium (make test installs it)")
    has_browser = bool(shutil.which("chromium") or shutil.which("chromium-browser"))
    gpu = _cuda()
    for item in items:
        if "gpu" in item.keywords and not gpu:
            item.add_marker(no_gpu)
        if "browser" in item.keywords and not has_browser:
            item.add_marker(no_browser)


@pytest.fixture
def torch_threads():
    """`torch_threads(n)` sets torch's intra-op threads for the test; restored after. A tiny
    model gains nothing from more threads, and on a shared machine they only contend."""
    import torch

    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)
