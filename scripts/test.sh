#!/usr/bin/env bash
# The whole test suite: set up this machine, lint, then every test tier that can run here.
# Tests that cannot run here (no GPU, ...) are skipped with their reason in the summary (-ra).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh embedded,test
.venv/bin/ruff check .
.venv/bin/ruff format --check .
# Two workers (pytest-xdist): the long builds (bundle + Ansible converge, CPU image, OpenClaw layer)
# are xdist groups handed out first, so they run beside the rest (tests/conftest.py); a module is
# otherwise one unit. APPLIANCE_TEST_WORKERS=0 runs everything in this process.
workers="${APPLIANCE_TEST_WORKERS:-2}"
# The console's browser tests save screenshots (tests/browser.py): kept after a passing run too,
# for CI to collect. The default directory is emptied first, so it holds this run's only. Not
# APPLIANCE_*: the CLIs the tests start read every exported APPLIANCE_* variable as a setting.
if [ -z "${TEST_ARTIFACTS:-}" ]; then
  export TEST_ARTIFACTS="$PWD/build/test-artifacts"
  rm -rf "$TEST_ARTIFACTS"
fi
if [ "$workers" = 0 ]; then
  exec .venv/bin/python -m pytest "$@"
fi
# Workers' tmp_path gain a "popen-gwN/" level, and unix socket paths under them must stay within
# 107 bytes: a short base of our own (kept when the run fails, for its logs and state dirs).
base="$(mktemp -d /tmp/pt.XXXXXX)"
rc=0
.venv/bin/python -m pytest -n "$workers" --dist loadgroup --no-loadscope-reorder \
  --basetemp "$base" "$@" || rc=$?
# pytest's exit status is the script's: 0 all passed, 1 failures, 2 interrupted, 5 none collected.
if [ "$rc" = 0 ]; then rm -rf "$base"; else echo "test.sh: pytest exit $rc; temp files kept in $base" >&2; fi
exit "$rc"
