"""Print a project's runtime requirements from its pyproject.toml, one per line.

Used by the image build to install the dependencies in a layer of their own, before the
source is copied, so that editing code does not re-download them. Requirements whose
distribution is already installed and named in ``--keep-installed`` are left out: the NVIDIA
PyTorch images carry torch as a pre-release build (e.g. ``2.10.0a0+<hash>``) that pip would
otherwise try to replace with a PyPI wheel.

Usage: python3 pyproject_deps.py PYPROJECT [--extra NAME ...] [--keep-installed NAME ...]
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path


def requirement_name(requirement: str) -> str:
    """The normalized distribution name of a PEP 508 requirement string ("Foo_bar>=1" -> "foo-bar")."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if match is None:
        raise ValueError(f"not a requirement: {requirement!r}")
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def is_installed(name: str) -> bool:
    """Whether a distribution of this name is installed in the running interpreter."""
    try:
        metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return False
    return True


def runtime_requirements(pyproject: Path, extras: list[str], keep_installed: set[str]) -> list[str]:
    """Requirements of ``[project].dependencies`` plus the named optional extras, minus those
    named in ``keep_installed`` whose distribution is already present."""
    try:
        project = tomllib.loads(pyproject.read_text())["project"]
    except (OSError, tomllib.TOMLDecodeError, KeyError) as err:
        raise SystemExit(f"{pyproject}: cannot read [project] ({err})") from err
    requirements = list(project.get("dependencies", []))
    optional = project.get("optional-dependencies", {})
    for extra in extras:
        if extra not in optional:
            raise SystemExit(f"{pyproject}: no optional-dependencies group {extra!r}")
        requirements += optional[extra]
    keep = {requirement_name(n) for n in keep_installed}
    kept = [r for r in requirements if requirement_name(r) in keep]
    installed = {requirement_name(r) for r in kept if is_installed(requirement_name(r))}
    return [r for r in requirements if requirement_name(r) not in installed]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pyproject", type=Path)
    parser.add_argument("--extra", action="append", default=[])
    parser.add_argument("--keep-installed", action="append", default=[])
    args = parser.parse_args(argv)
    for line in runtime_requirements(args.pyproject, args.extra, set(args.keep_installed)):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
