"""Agents through a real control plane, for the integration tests (test_agents_api.py,
test_agent_turns.py): a catalog of `kind: command` test blueprints on the base image (no model),
the CLI's environment for it, and small clients of the API and the CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import yaml

from appliance.audit import audit_path, records
from sandbox.images.base import recipe_digest
from tests.control_fixtures import control_socket
from tests.helpers import cli_env
from tests.sandbox_fixtures import ensure_base_image, sandbox_skip_reason

APPLIANCE = str(Path(sys.executable).parent / "appliance")
# The reply names the session and echoes the message: it must arrive unevaluated, as one value.
TURN = ["sh", "-c", 'printf "%s|%s" "$AGENT_SESSION" "$AGENT_MESSAGE"']
# An always-on runtime (the supervisor keeps it up; turns go over the agent socket): the stdlib
# /v1/responses server, noting in the agent's home each client that hangs up mid-stream.
SERVED_PORT = 18790
DISCONNECT_LOG = "/home/agent/disconnects.log"
SERVED = [
    "/usr/bin/env",
    f"DISCONNECT_LOG={DISCONNECT_LOG}",
    "python3",
    "-c",
    (Path(__file__).parent / "fixtures" / "responses_server.py").read_text(),
    str(SERVED_PORT),
]


def blueprint_doc(name: str, **runtime: object) -> dict:
    return {
        "name": name,
        "version": "1.0.0",
        "runtime": {"kind": "command", "command": ["sleep", "infinity"], **runtime},
        "image": {"name": "localhost/appliance-base", "digest": recipe_digest()},
        "sandbox": {"base": "default"},
        "budgets": {"daily_tokens": 1000},
    }


def catalog_env(root: Path) -> dict[str, str]:
    """A catalog of test blueprints under `root` and the CLI's environment for `root/s`."""
    catalog = root / "bp"
    slow = {"turn": ["sh", "-c", "sleep 20; echo late"]}
    served = {"command": SERVED, "serve": {"port": SERVED_PORT}}
    for name, runtime in (
        ("echoer", {"turn": TURN}),
        ("quiet", {}),
        ("slow", slow),
        ("served", served),
    ):
        path = catalog / name / "1.0.0" / "blueprint.yaml"
        path.parent.mkdir(parents=True)
        path.write_text(yaml.safe_dump(blueprint_doc(name, **runtime)))
    newer = blueprint_doc("quiet") | {"version": "1.1.0", "budgets": {"daily_tokens": 2000}}
    (catalog / "quiet" / "1.1.0").mkdir()
    (catalog / "quiet" / "1.1.0" / "blueprint.yaml").write_text(yaml.safe_dump(newer))
    return cli_env(root / "s", root, APPLIANCE_BLUEPRINTS__DIRS=json.dumps([str(catalog)]))


@contextmanager
def sandbox_root() -> Iterator[Path]:
    if (why := sandbox_skip_reason()) is not None:
        pytest.skip(why)
    ensure_base_image()
    root = Path(tempfile.mkdtemp(prefix="aa-"))  # short: unix socket paths live under it
    root.chmod(0o755)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def remove_agents(env: dict[str, str]) -> None:
    with api_client(env) as client:
        for row in client.get("/agents").json():
            client.delete(f"/agents/{row['name']}")


def api_client(env: dict[str, str]) -> httpx.Client:
    socket = control_socket(Path(env["APPLIANCE_STATE_DIR"]))
    return httpx.Client(
        transport=httpx.HTTPTransport(uds=str(socket)),
        base_url="http://control/api/v1",
        timeout=300,
    )


def run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([APPLIANCE, *args], env=env, capture_output=True, text=True, timeout=600)


def agent_audit(env: dict[str, str], agent: str) -> list[dict]:
    state = Path(env["APPLIANCE_STATE_DIR"])
    return [r for r in records(audit_path(state)) if r.get("agent") == agent]
