#!/usr/bin/env bash
# The whole test suite: set up this machine, lint, then every test tier that can run here.
# Tests that cannot run here (no GPU, ...) are skipped with their reason in the summary (-ra).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh embedded,test
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/python -m pytest "$@"
