"""Notifications through a real control plane (`appliance serve control`) to a real local HTTP
receiver: `appliance notify list|test` as an operator runs them, a kill pushed as agent.killed,
each delivery's outcome in the audit chain, and no secret anywhere but in the signature."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from appliance.control.notify.signing import SIGNATURE_HEADER, TIMESTAMP_HEADER, verify
from tests.control_fixtures import running_control_plane
from tests.helpers import cli_env, free_port
from tests.notify_fixtures import Receiver, receiver

pytestmark = pytest.mark.integration

APPLIANCE = str(Path(sys.executable).parent / "appliance")
SECRET = "integration-hook-secret-7f3a"


@dataclass
class Setup:
    env: dict[str, str]
    state: Path
    rx: Receiver
    port: int

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [APPLIANCE, *args], env=self.env, capture_output=True, text=True, timeout=60
        )

    def audit(self) -> list[dict]:
        path = self.state / "audit" / "audit.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()]

    def wait_audit(self, match: dict[str, object], timeout: float = 10.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for rec in self.audit():
                if all(rec.get(k) == v for k, v in match.items()):
                    return rec
            time.sleep(0.05)
        raise AssertionError(f"no audit record {match}")


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    state = tmp_path / "state"
    with receiver() as rx:
        config = tmp_path / "appliance.yaml"
        config.write_text(
            "notify:\n"
            "  webhooks:\n"
            "    - name: ops\n"
            f"      url: {rx.url}\n"
            "      events: [agent.killed, approval.pending, audit.tamper]\n"
            "      secret_env: OPS_HOOK_SECRET\n"
            "      timeout_s: 5\n"
        )
        port = free_port()
        env = cli_env(
            state,
            tmp_path,
            APPLIANCE_CONFIG=str(config),
            APPLIANCE_CONTROL__PORT=str(port),
            OPS_HOOK_SECRET=SECRET,
        )
        with running_control_plane(env, state):
            yield Setup(env, state, rx, port)


def signed_body(setup: Setup, index: int) -> dict:
    req = setup.rx.wait_for(index + 1)[index]
    ts, sig = req.headers[TIMESTAMP_HEADER], req.headers[SIGNATURE_HEADER]
    assert verify(SECRET.encode(), ts, req.body, sig), "the receiver could not verify it"
    assert req.headers["Content-Type"] == "application/json"
    return json.loads(req.body)


def test_notify_list_test_and_a_kill_pushed(setup: Setup) -> None:
    listed = setup.cli("notify", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    [hook] = json.loads(listed.stdout)
    assert hook["name"] == "ops" and hook["secret_from"] == "env OPS_HOOK_SECRET"
    assert hook["last"] is None

    sent = setup.cli("notify", "test", "ops")
    assert sent.returncode == 0, sent.stderr
    assert "delivered a test notification to ops (HTTP 200)" in sent.stdout
    body = signed_body(setup, 0)
    assert body["event"] == "test" and body["requested_by"].startswith("uid:")
    setup.wait_audit({"event": "notify.delivered", "hook": "ops", "notification": "test"})

    killed = setup.cli("kill", "--all")
    assert killed.returncode == 0, killed.stderr
    body = signed_body(setup, 1)
    assert body["event"] == "agent.killed" and body["sandboxes"] == []
    assert body["reason"] == "operator kill switch"
    record = setup.wait_audit(
        {"event": "notify.delivered", "hook": "ops", "notification": "agent.killed"}
    )
    assert record["attempts"] == 1 and record["status"] == 200
    assert record["event_id"] == body["id"]

    listed = json.loads(setup.cli("notify", "list", "--json").stdout)
    assert listed[0]["last"]["notification"] == "agent.killed" and listed[0]["last"]["ok"]
    table = subprocess.run(
        [APPLIANCE, "notify", "list"],
        env={**setup.env, "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert table.returncode == 0 and "ops" in table.stdout
    assert "agent.killed delivered, HTTP 200, 1 attempt" in table.stdout
    log = (setup.state / "audit" / "audit.jsonl").read_text()
    assert SECRET not in log and setup.rx.url not in log


def test_errors_are_one_line_with_a_hint(setup: Setup) -> None:
    unknown = setup.cli("notify", "test", "nope")
    assert unknown.returncode == 5
    assert unknown.stderr.splitlines() == [
        "appliance: error: no webhook named 'nope'; configured: ops",
        "  hint: `appliance notify list`",
    ]
    setup.rx.script.append(503)
    failed = setup.cli("notify", "test", "ops", "--json")
    assert failed.returncode == 1
    assert json.loads(failed.stdout)["status"] == 503
    lines = failed.stderr.splitlines()
    assert lines[0] == "appliance: error: the test notification to ops failed: HTTP 503"
    assert lines[1].startswith("  hint: ")
    setup.wait_audit({"event": "notify.failed", "hook": "ops", "status": 503})


def test_a_viewer_sees_the_webhooks_but_cannot_send(setup: Setup) -> None:
    made = setup.cli("operators", "create", "watcher", "--role", "viewer", "--json")
    assert made.returncode == 0, made.stderr
    token = json.loads(made.stdout)["secret"]
    base = f"http://127.0.0.1:{setup.port}/api/v1"
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}) as api:
        listed = api.get("/notify")
        assert listed.status_code == 200 and listed.json()[0]["name"] == "ops"
        assert SECRET not in listed.text
        refused = api.post("/notify/ops/test")
        assert refused.status_code == 403
        assert refused.json()["error"]["type"] == "forbidden"
    assert setup.rx.requests == []


def test_a_forged_record_in_the_log_is_pushed_as_tamper(setup: Setup) -> None:
    killed = setup.cli("kill", "--all")
    assert killed.returncode == 0, killed.stderr
    # pushed: the follower is positioned and past every record so far
    assert signed_body(setup, 0)["event"] == "agent.killed"
    path = setup.state / "audit" / "audit.jsonl"
    last = json.loads(path.read_text().splitlines()[-1])
    forged = {"seq": last["seq"] + 1, "ts": last["ts"], "event": "budget.set",
              "prev": "f" * 64, "hash": "e" * 64}  # fmt: skip
    with path.open("a") as f:  # someone with write access, not through the chain writer
        f.write(json.dumps(forged, separators=(",", ":")) + "\n")
    body = signed_body(setup, 1)
    assert body["event"] == "audit.tamper" and body["kind"] == "chain"
    assert f"seq {forged['seq']} does not link" in body["detail"]
    setup.wait_audit({"event": "notify.delivered", "notification": "audit.tamper"})
