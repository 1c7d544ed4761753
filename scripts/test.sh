#!/usr/bin/env bash
# Install what the tests need and run the whole suite (what CI runs).
#   bash scripts/test.sh                       # every test
#   bash scripts/test.sh --fast                # the edit loop: leaves out the tests marked slow,
#                                              # flower or gpu (pyproject.toml, docs/contributing.md)
#   bash scripts/test.sh tests/test_data.py    # further arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# HAProxy: the fleet gateway of a Flower deployment (scripts/flower/fleet-gateway.cfg), which
# tests/test_flower_deploy.py runs the hospitals through; from the OS packages (Debian/Ubuntu).
# Only the tests need it (the quickstart does not), and that test skips, saying why, without it.
if ! command -v haproxy >/dev/null 2>&1; then
    SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
    { command -v apt-get >/dev/null && $SUDO apt-get update -qq \
        && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq haproxy >/dev/null; } \
        || echo "test.sh: could not install haproxy; the gateway test will skip" >&2
fi
args=()
for arg in "$@"; do
    if [ "$arg" = "--fast" ]; then
        args+=(-m "not slow and not flower and not gpu")
    else
        args+=("$arg")
    fi
done
# --durations: the slowest tests, to keep the whole run well under 30 minutes on CI
exec .venv/bin/python -m pytest -q --durations=15 "${args[@]}"
