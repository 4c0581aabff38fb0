"""Wheels copied along with the checkout (`make gpu-wheels`), put on sys.path without pip
or a network: a wheel is a zip of the installed tree."""

from __future__ import annotations

import atexit
import importlib
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path


def add_wheels(folder: Path) -> list[str]:
    """Unpack every wheel in `folder` into one temporary directory put first on sys.path;
    returns the wheels' file names (none when the folder is absent or empty)."""
    wheels = sorted(folder.glob("*.whl")) if folder.is_dir() else []
    if not wheels:
        return []
    target = Path(tempfile.mkdtemp(prefix="gpu-check-wheels-"))
    atexit.register(shutil.rmtree, target, ignore_errors=True)
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as z:
            z.extractall(target)
    sys.path.insert(0, str(target))
    importlib.invalidate_caches()
    return [w.name for w in wheels]
