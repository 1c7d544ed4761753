#!/usr/bin/env bash
# Install what the tests need and run the whole suite (what CI runs).
#   bash scripts/test.sh                       # every test
#   bash scripts/test.sh --fast                # the edit loop: leaves out the tests marked slow,
#                                              # flower or gpu (pyproject.toml, docs/contributing.md)
#   bash scripts/test.sh tests/test_data.py    # further arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
args=()
for arg in "$@"; do
    if [ "$arg" = "--fast" ]; then
        args+=(-m "not slow and not flower and not gpu")
    else
        args+=("$arg")
    fi
done
exec .venv/bin/python -m pytest -q "${args[@]}"
