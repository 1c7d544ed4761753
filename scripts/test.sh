#!/usr/bin/env bash
# Install what the tests need and run the whole suite (what CI runs).
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
exec .venv/bin/python -m pytest -q "$@"
