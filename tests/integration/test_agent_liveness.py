"""The control plane keeps an always-on agent alive, and its absence stops it: a served
`kind: command` agent (tests/fixtures/responses_server.py as its runtime) with
`lifecycle.fail_closed_after: 20`, on a real control plane, beside a plain one (`sleep infinity`,
no service: its main process is kept up and fails closed all the same).

- the control plane's check-ins keep the runtime `running`;
- `kill -9` of the control plane: the sandbox's supervisor stops the runtime (`fail_closed`)
  within fail_closed_after + 10 s; the next control plane's check-ins start it again, and it
  audits both (agent.runtime.fail_closed, agent.runtime.running, actor `control-plane`);
- a graceful stop parks both, in name order (each `sandbox.parked` with its place); the next
  control plane's reconciliation checks in before it starts the container, so the runtime runs
  at once (it is not left `waiting` for a check-in) and takes a turn.
"""

from __future__ import annotations

import json
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import yaml

from appliance.audit import audit_path, records
from appliance.config import ApplianceConfig, SandboxConfig
from appliance.control.wiring import opened_manager
from sandbox.images.base import recipe_digest
from tests.control_fixtures import control_socket, running_control_plane
from tests.helpers import SERVICE_USER, cli_env
from tests.sandbox_fixtures import ensure_base_image, sandbox_skip_reason

pytestmark = [pytest.mark.integration, pytest.mark.slow]

AGENT = "alive"
PLAIN = "plain"  # after AGENT in name order
PORT = 18790
FAIL_CLOSED_AFTER = 20
SERVER = Path(__file__).parents[1] / "fixtures" / "responses_server.py"
T = TypeVar("T")


def _environment(root: Path) -> dict[str, str]:
    plain = {
        "name": PLAIN,
        "version": "1.0.0",
        "runtime": {"kind": "command", "command": ["sleep", "infinity"]},
        "image": {"name": "localhost/appliance-base", "digest": recipe_digest()},
        "sandbox": {"base": "default"},
        "lifecycle": {"fail_closed_after": FAIL_CLOSED_AFTER},
    }
    path = root / "bp" / PLAIN / "1.0.0" / "blueprint.yaml"
    path.parent.mkdir(parents=True)
    path.write_text(yaml.safe_dump(plain))
    blueprint = {
        "name": "alive",
        "version": "1.0.0",
        "runtime": {
            "kind": "command",
            "command": ["python3", "-c", SERVER.read_text(), str(PORT)],
            "serve": {"port": PORT},
        },
        "image": {"name": "localhost/appliance-base", "digest": recipe_digest()},
        "sandbox": {"base": "default"},
        "budgets": {"daily_tokens": 1000},
        "lifecycle": {"fail_closed_after": FAIL_CLOSED_AFTER},
    }
    path = root / "bp" / "alive" / "1.0.0" / "blueprint.yaml"
    path.parent.mkdir(parents=True)
    path.write_text(yaml.safe_dump(blueprint))
    return cli_env(root / "s", root, APPLIANCE_BLUEPRINTS__DIRS=json.dumps([str(root / "bp")]))


@pytest.fixture
def env() -> Iterator[dict[str, str]]:
    if (why := sandbox_skip_reason()) is not None:
        pytest.skip(why)
    ensure_base_image()
    root = Path(tempfile.mkdtemp(prefix="al-"))  # short: unix socket paths live under it
    root.chmod(0o755)
    env = _environment(root)
    try:
        yield env
    finally:
        with running_control_plane(env, root / "s"), _client(root / "s") as client:
            client.delete(f"/agents/{AGENT}")
            client.delete(f"/agents/{PLAIN}")
        shutil.rmtree(root, ignore_errors=True)


def _client(state: Path) -> httpx.Client:
    return httpx.Client(
        transport=httpx.HTTPTransport(uds=str(control_socket(state))),
        base_url="http://control/api/v1",
        timeout=120,
    )


def _runtime(state: Path, agent: str = AGENT) -> dict[str, Any]:
    """The supervisor's runtime section, read on the host as the control plane reads it."""
    config = ApplianceConfig(state_dir=state, sandbox=SandboxConfig(service_user=SERVICE_USER))
    with opened_manager(config) as manager:
        return manager.runtime_state(agent) or {}


def _wait(what: str, timeout: float, probe: Callable[[], T | None], every: float = 0.5) -> T:
    deadline = time.monotonic() + timeout
    while True:
        found = probe()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f} s")
        time.sleep(every)


def _runtime_in(state: Path, wanted: str, timeout: float, agent: str = AGENT) -> dict[str, Any]:
    return _wait(
        f"{agent}'s runtime {wanted}",
        timeout,
        lambda: (r := _runtime(state, agent)).get("state") == wanted and r,
    )


def _audit(state: Path, event: str, agent: str = AGENT) -> list[dict[str, Any]]:
    return [
        r
        for r in records(audit_path(state))
        if r["event"] == event and agent in (r.get("agent"), r.get("sandbox"))
    ]


def _turn(client: httpx.Client, message: str) -> dict[str, Any]:
    answer = client.post(f"/agents/{AGENT}/turns", json={"message": message, "session": "s1"})
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_fail_closed_without_the_control_plane_and_back_with_it(env: dict[str, str]) -> None:
    state = Path(env["APPLIANCE_STATE_DIR"])
    with running_control_plane(env, state) as plane, _client(state) as client:
        made = client.post("/agents", json={"name": AGENT, "blueprint": "alive@1.0.0"})
        assert made.status_code == 201, made.text
        made = client.post("/agents", json={"name": PLAIN, "blueprint": f"{PLAIN}@1.0.0"})
        assert made.status_code == 201, made.text
        _runtime_in(state, "running", 30)
        plain = _runtime_in(state, "running", 30, PLAIN)  # kept up by PID 1, as a service is
        assert plain["fail_closed_after"] == FAIL_CLOSED_AFTER, plain
        assert _turn(client, "hello")["reply"] == "s1|1|hello"
        # Check-ins keep it up past its window.
        time.sleep(FAIL_CLOSED_AFTER + 5)
        assert _runtime(state)["state"] == "running"
        assert _runtime(state, PLAIN)["state"] == "running"
        plane.send_signal(signal.SIGKILL)  # a crash: nothing parks it
        plane.wait(10)
        killed_at = time.monotonic()

    closed = _runtime_in(state, "fail_closed", FAIL_CLOSED_AFTER + 10)
    closed_in = time.monotonic() - killed_at
    assert closed_in <= FAIL_CLOSED_AFTER + 10, closed_in
    assert closed["fail_closed_after"] == FAIL_CLOSED_AFTER
    _runtime_in(state, "fail_closed", 10, PLAIN)  # no service: it fails closed all the same

    with running_control_plane(env, state) as plane, _client(state) as client:
        back_at = time.monotonic()
        _runtime_in(state, "running", 15)
        back_in = time.monotonic() - back_at
        _runtime_in(state, "running", 15, PLAIN)
        _wait("the recovery audited", 15, lambda: _audit(state, "agent.runtime.running"))
        [failed] = _audit(state, "agent.runtime.fail_closed")
        assert failed["actor"] == "control-plane" and failed["actor_kind"] == "system"
        assert _turn(client, "again")["reply"].startswith("s1|")  # a fresh runtime: count 1
        plane.send_signal(signal.SIGTERM)  # `appliance down`: parked
        assert plane.wait(30) == 0
    [parked] = _audit(state, "sandbox.parked")
    assert parked["reason"] == "control plane shutdown" and parked["order"] == 1, parked
    [parked] = _audit(state, "sandbox.parked", PLAIN)
    assert parked["order"] == 2, parked
    [shutdown] = [r for r in records(audit_path(state)) if r["event"] == "control.shutdown"]
    assert shutdown["order"] == [AGENT, PLAIN] and shutdown["parked"] == [AGENT, PLAIN], shutdown

    with running_control_plane(env, state), _client(state) as client:
        # Reconciliation checked in before it started the container: running, not `waiting`.
        restarted = _runtime_in(state, "running", 30)
        assert restarted["restarts"] == 0, restarted
        assert _turn(client, "after the restart")["ok"] is True
    print(
        f"\nfigures: fail closed {closed_in:.1f} s after kill -9 (fail_closed_after "
        f"{FAIL_CLOSED_AFTER}); running again {back_in:.1f} s after the control plane returned"
    )
