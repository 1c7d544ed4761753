#!/usr/bin/env bash
# Create .venv (once) and install CollaFuse with its test tools. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
# torch==2.13.0 is pinned in pyproject.toml: a CPU wheel; an open range would pull a CUDA build.
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
# clean-fid supplies KID's "clean" resizer (cleanfid.resize, imported alone). It declares
# torchvision, which kid.py never imports and which would replace our CPU torch with a newer CUDA
# build, so it is installed without dependencies; its other imports (numpy, pillow, scipy,
# requests, tqdm) come with ours.
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps clean-fid==0.1.35
