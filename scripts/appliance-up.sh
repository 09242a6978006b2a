#!/usr/bin/env bash
# Quick start: set up this machine, bring the appliance up, and print its status.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh embedded
.venv/bin/appliance up
.venv/bin/appliance status
