"""Benchmarks of the container image: build time cold and cached, image size, smoke test time.

Everything runs through `containers/images.mk` on the debootstrap CPU base (`make base-cpu`),
the variant this machine can build; the NVIDIA base cannot be pulled here.
- build: a cold build (`--no-cache`: every layer after FROM, pip downloads included) and then
  the same build again (every layer from cache); ratio = cached / cold.
- size: the image against its base (ratio = image / base).
- smoke: `esm3-smoke` in a container against starting the same container with `true`
  (ratio = smoke / bare start, the cost of the checks themselves).
`quick=True` never builds: it reports the size of an image already built, if any.
Without podman or the base image the suite is skipped: a warning names the reason and no
rows are returned.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from jobs.bench import bench_row

SUITE = "images"
ROOT = Path(__file__).resolve().parents[2]
MAKEFILE = ROOT / "containers" / "images.mk"
BENCH_TAG = "esm3-suite:bench"
log = logging.getLogger(__name__)


def _make_default(var: str) -> str:
    m = re.search(rf"^{var} \?= (\S+)$", MAKEFILE.read_text(), re.M)
    if m is None:
        raise RuntimeError(f"{MAKEFILE}: no default for {var}")
    return m.group(1)


def _podman(*args: str, check: bool = True, timeout: float = 3600) -> subprocess.CompletedProcess:
    env = {**os.environ, "CONTAINERS_CONF": str(ROOT / "containers" / "podman.conf")}
    r = subprocess.run(["podman", *args], capture_output=True, text=True, env=env, timeout=timeout)
    if check and r.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args)} failed: {r.stderr.strip()[-2000:]}")
    return r


def _exists(image: str) -> bool:
    return _podman("image", "exists", image, check=False).returncode == 0


def _size_mb(image: str) -> float:
    """Image size in MB (10^6 bytes), as podman reports it (all layers, uncompressed)."""
    return int(_podman("image", "inspect", "--format", "{{.Size}}", image).stdout.strip()) / 1e6


def unavailable(base: str) -> str | None:
    """Why the image benchmarks cannot run here, or None."""
    if not shutil.which("podman"):
        return "podman is not installed (make base-cpu installs it)"
    if not _exists(base):
        return f"the CPU base image {base} is absent (make base-cpu builds it, ~2 minutes)"
    return None


def _row(name: str, metric: str, value: float, unit: str, baseline: float | None, **params):
    return bench_row(SUITE, name, metric, value, unit, baseline=baseline, params=params)


def _timed_make_build(extra_args: str) -> float:
    bin_dir = Path(sys.executable).parent
    cmd = ["make", "-s", "-f", str(MAKEFILE), "image-cpu", f"BIN={bin_dir}",
           f"IMAGE_CPU={BENCH_TAG}", f"IMAGE_BUILD_ARGS={extra_args}"]  # fmt: skip
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=3600)
    elapsed = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"make image-cpu failed: {r.stderr.strip()[-2000:]}")
    return elapsed


def _timed_run(image: str, *cmd: str) -> float:
    t0 = time.perf_counter()
    _podman("run", "--rm", "--network", "host", "--no-healthcheck", image, *cmd)
    return time.perf_counter() - t0


def run(quick: bool = False) -> list[dict]:
    base = _make_default("BASE_CPU")
    reason = unavailable(base)
    if reason:
        log.warning("bench %s skipped: %s", SUITE, reason)
        return []
    params = {"base": base, "cpus": os.cpu_count()}
    if quick:
        image = _make_default("IMAGE_CPU")
        if not _exists(image):
            log.warning("bench %s (quick) skipped: %s not built (make image-cpu)", SUITE, image)
            return []
        return [_row("image", "size", _size_mb(image), "MB", _size_mb(base), image=image, **params)]

    rows = []
    try:
        cold = _timed_make_build("--no-cache")
        cached = _timed_make_build("")
        rows.append(_row("build", "cold", cold, "s", None, image=BENCH_TAG, **params))
        rows.append(_row("build", "cached", cached, "s", cold, image=BENCH_TAG, **params))
        rows.append(_row("image", "size", _size_mb(BENCH_TAG), "MB", _size_mb(base), **params))
        bare = _timed_run(BENCH_TAG, "true")
        smoke = _timed_run(BENCH_TAG, "esm3-smoke")
        rows.append(_row("smoke", "wall", smoke, "s", bare, image=BENCH_TAG, **params))
    finally:
        _podman("rmi", "-f", BENCH_TAG, check=False)
    return rows


if __name__ == "__main__":
    import json

    logging.basicConfig(level=logging.INFO)
    for row in run(quick="--quick" in sys.argv):
        print(json.dumps(row))
