#!/usr/bin/env bash
# `pip install --no-cache-dir ARGS...` for the image build. Behind a TLS-intercepting proxy the
# build passes the host's CA bundle as the build secret `pip-cert` (see containers/images.mk);
# it is mounted for one RUN step only and never stored in a layer.
set -euo pipefail
cert=/run/secrets/pip-cert
if [ -s "$cert" ]; then export PIP_CERT="$cert"; fi
# Debian marks its python as externally managed (PEP 668); inside an image we own it.
export PIP_BREAK_SYSTEM_PACKAGES=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
exec python3 -m pip install --no-cache-dir "$@"
