#!/usr/bin/env bash
# Quick start: set up this machine, bring the appliance up the way this host needs (the planner
# decides: the embedded model on a host without a GPU; on a GPU host, or with --container, the
# appliance image under Podman, the CDI spec and the model's weights first), start the demo
# OpenClaw agent in its sandbox, ask it one thing through inference.local, and print the status.
#
# Usage: scripts/appliance-up.sh [--dry-run] [--host-snapshot FILE] [--container]
#   --dry-run             print every step and the commands it would run; start nothing
#   --host-snapshot FILE  with --dry-run: the steps for a recorded host (tests/fixtures/hosts/)
#   --container           serve from the appliance image under Podman even without a GPU
#
# Sandboxes need root (the control plane drives the service user's rootless Podman): as another
# user this stops after `appliance up`. APPLIANCE_NO_AGENT=1 skips the agent.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '/^# Usage:/,/^#$/s/^# \{0,1\}//p' "$0"; }
die() { echo "appliance-up: $*" >&2; exit 2; }

dry_run=0
up_flags=()
while (($#)); do
    case "$1" in
        --dry-run) dry_run=1 ;;
        --host-snapshot)
            (($# >= 2)) || die "--host-snapshot needs a FILE"
            up_flags+=(--host-snapshot "$2")
            shift
            ;;
        --host-snapshot=*) up_flags+=(--host-snapshot "${1#*=}") ;;
        --container) up_flags+=(--container) ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; die "unknown option: $1" ;;
    esac
    shift
done
if ((!dry_run)) && [[ " ${up_flags[*]} " == *" --host-snapshot "* ]]; then
    die "--host-snapshot is for --dry-run only (a recorded host runs nothing)"
fi

appliance="${APPLIANCE_VENV:-.venv}/bin/appliance"
if ((dry_run)); then
    if [[ ! -x "$appliance" ]]; then
        echo "1. set up [todo]: no ${APPLIANCE_VENV:-.venv} yet: scripts/setup.sh creates it"
        echo "   \$ scripts/setup.sh"
        echo "the rest is planned by the appliance itself: run scripts/setup.sh, then" \
            "scripts/appliance-up.sh --dry-run again"
        exit 0
    fi
    exec "$appliance" up --dry-run "${up_flags[@]}"
fi

# The base install first: it is enough to ask the planner which path this host takes.
scripts/setup.sh
embedded_on_host="$("$appliance" up --dry-run --json "${up_flags[@]}" \
    | "$(dirname "$appliance")/python" -c 'import json, sys; print(json.load(sys.stdin)["embedded_on_host"])')"
if [[ "$embedded_on_host" == True ]]; then
    scripts/setup.sh embedded  # the embedded model runs in this venv (torch, transformers, gguf)
fi
"$appliance" up "${up_flags[@]}"
if [[ "${APPLIANCE_NO_AGENT:-0}" != 1 && "$(id -u)" == 0 ]]; then
    # First run: builds the OpenClaw image layer (npm, PyPI and Debian registries; ~3 min).
    "$appliance" agent list --json | grep -q '"name": "demo"' \
        || "$appliance" agent create demo --blueprint openclaw
    "$appliance" agent run demo "Reply with the word pong"
elif [[ "$(id -u)" != 0 ]]; then
    echo "not root: skipping the demo agent (sandboxes are created by root; see README)" >&2
fi
"$appliance" status
