#!/usr/bin/env bash
# Create .venv (once) and install CollaFuse with its test tools. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
# torch==2.13.0 is pinned in pyproject.toml: a CPU wheel; an open range would pull a CUDA build.
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
