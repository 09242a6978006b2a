#!/usr/bin/env bash
# Quick start: set up this machine, bring the appliance up, start the demo OpenClaw agent in its
# sandbox, ask it one thing through inference.local, and print the appliance's status.
# Sandboxes need root (the control plane drives the service user's rootless Podman): as another
# user this stops after `appliance up`. APPLIANCE_NO_AGENT=1 skips the agent.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh embedded
appliance=.venv/bin/appliance
$appliance up
if [[ "${APPLIANCE_NO_AGENT:-0}" != 1 && "$(id -u)" == 0 ]]; then
    # First run: builds the OpenClaw image layer (npm, PyPI and Debian registries; ~3 min).
    $appliance agent list --json | grep -q '"name": "demo"' \
        || $appliance agent create demo --blueprint openclaw
    $appliance agent run demo "Reply with the word pong"
elif [[ "$(id -u)" != 0 ]]; then
    echo "not root: skipping the demo agent (sandboxes are created by root; see README)" >&2
fi
$appliance status
