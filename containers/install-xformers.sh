#!/usr/bin/env bash
# Installs xformers that matches the base image's CUDA torch, or nothing on a CPU torch
# (xformers computes only on CUDA; the model falls back to torch SDPA).
#
# The NVIDIA images carry torch as a pre-release build (2.10.0a0+<hash>) that no PyPI xformers
# wheel names as a dependency, so the wheel is installed with --no-deps (torch stays as the
# base built it) and its declared torch requirement is then checked against the base's torch
# release: a mismatch fails the build, naming both versions, instead of failing at run time.
# XFORMERS_VERSION: the xformers release for the default base's torch (build arg);
# "none" skips xformers.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
version=${XFORMERS_VERSION:?set XFORMERS_VERSION (or none)}

cuda=$(python3 -c 'import torch; print(torch.version.cuda or "")')
if [ -z "$cuda" ] || [ "$version" = none ]; then
  echo "xformers: skipped (torch CUDA: ${cuda:-none}, XFORMERS_VERSION=${version})"
  exit 0
fi

"$here/pip-install.sh" --no-deps "xformers==${version}"

python3 - <<'EOF'
import sys
from importlib import metadata

import torch

try:
    from packaging.requirements import Requirement
    from packaging.version import Version
except ImportError:  # pip vendors packaging
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.version import Version

release = Version(Version(torch.__version__).base_version)  # 2.10.0a0+abc -> 2.10.0
needs = [Requirement(r) for r in metadata.requires("xformers") or []]
for req in needs:
    if req.name == "torch" and req.specifier and release not in req.specifier:
        sys.exit(
            f"xformers {metadata.version('xformers')} needs torch{req.specifier}, the base has "
            f"torch {torch.__version__}: set the build arg XFORMERS_VERSION to the release "
            "built for this torch (xformers' release notes list them)"
        )
import xformers  # noqa: E402,F401  the import must work without a GPU

print(f"xformers {metadata.version('xformers')} for torch {torch.__version__} (CUDA {torch.version.cuda})")
EOF
