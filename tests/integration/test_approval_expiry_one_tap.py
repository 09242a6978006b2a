"""Approvals expire, and a phone answers one with a one-tap link: a real sandbox, its real egress
proxy, a real control plane (`appliance serve control`, with its expirer and notify threads) and
the operator's CLI as subprocesses.

1. A held request nobody answers within its policy's hold_seconds is denied by the control plane
   (before the proxy's own backstop), `approval.expired` is in the audit chain, the webhook is
   told, and a late `appliance approvals approve` is a conflict (exit 10, "already expired").
2. With notify.one_tap: true, a local HTTP receiver (a json webhook) gets a correctly signed
   approval.pending whose link's page (GET) approves nothing and whose POST approves once: the
   sandbox's request reaches the origin, audited as approved by webhook:phone; a second POST is
   refused (409).

Like test_sandbox_approvals.py, the origin has a public address in a network namespace of its own
(an approval never opens a private address) where the control plane runs too; so do the webhook
receiver (the control plane delivers to 127.0.0.1 there) and, through a forwarded port, the
phone's view of the console (notify.console_url).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from appliance.control.notify.signing import SIGNATURE_HEADER, TIMESTAMP_HEADER, verify
from tests.control_fixtures import running_control_plane
from tests.helpers import cli_env, free_port
from tests.integration.origin_namespace import (
    JOB_AGENT,
    Origin,
    drop_job,
    forwarded_port,
    job_result,
    origin_namespace,
    webhook_receiver,
)
from tests.integration.origin_namespace import (
    skip_reason as origin_skip_reason,
)
from tests.sandbox_fixtures import (
    ensure_base_image,
    force_remove_container,
    kill_proxies,
    run_cli,
    service_home,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

if (_why := origin_skip_reason()) is not None:
    pytest.skip(_why, allow_module_level=True)

POLICIES = Path(__file__).resolve().parents[2] / "sandbox" / "policies"
SHORT_HOLD_S = 8  # part 1: expires while the test watches (a few CLI calls first)
LONG_HOLD_S = 120  # part 2: must not expire while the phone answers
BACKSTOP_GRACE_S = 5.0  # sandbox/proxy/approvals.py: the proxy's own refusal comes this late
RESULT_TIMEOUT = 45.0
HOOK = "phone"
SECRET = "one-tap-test-secret-0123456789"
CONFLICT_EXIT = 10


@dataclass
class Lab:
    scratch: Path
    state: Path
    env: dict[str, str]
    origin: Origin
    inbox: Path
    console: str  # the console as the phone reaches it
    created: set[str] = field(default_factory=set)

    def cli(self, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
        proc = run_cli(*args, env=self.env, timeout=180)
        if ok:
            assert proc.returncode == 0, f"appliance {' '.join(args)}: {proc.stderr}"
        assert "Traceback" not in proc.stderr, proc.stderr
        return proc

    def policy_file(self, name: str, hold_s: float) -> Path:
        policy = yaml.safe_load((POLICIES / "default.yaml").read_text())
        policy["network"]["approval"] = {"mode": "hold", "hold_seconds": hold_s}
        path = self.scratch / name
        path.write_text(yaml.safe_dump(policy, sort_keys=False))
        return path

    def home(self, box: str) -> Path:
        home = service_home()
        assert home is not None
        return home / "homes" / box

    def request(self, box: str, url: str) -> str:
        return drop_job(self.home(box), url)

    def result(self, box: str, job: str) -> dict[str, Any]:
        out = job_result(self.home(box), job, RESULT_TIMEOUT)
        assert out is not None, f"no result for {job}: {self.cli('sandbox', 'logs', box).stdout}"
        return out

    def wait_pending(self, box: str, host: str) -> dict[str, Any]:
        deadline = time.monotonic() + RESULT_TIMEOUT
        while time.monotonic() < deadline:
            for p in json.loads(self.cli("approvals", "list", "--json").stdout):
                if p["sandbox"] == box and p["host"] == host:
                    return p
            time.sleep(0.2)
        raise AssertionError(f"no pending approval for {host} from {box}")

    def audit(self, **match: Any) -> list[dict[str, Any]]:
        log = self.state / "audit" / "audit.jsonl"
        lines = log.read_text().splitlines() if log.is_file() else []
        records = [json.loads(line) for line in lines if line]
        return [r for r in records if all(r.get(k) == v for k, v in match.items())]

    def delivered(self, event: str, approval: str) -> dict[str, Any]:
        """The receiver's delivery of `event` for `approval`: its headers, raw body, JSON."""
        deadline = time.monotonic() + RESULT_TIMEOUT
        while time.monotonic() < deadline:
            for path in sorted(self.inbox.glob("*.json")):
                got = json.loads(path.read_text())
                raw = base64.b64decode(got["body"])
                body = json.loads(raw)
                if body.get("event") == event and body.get("approval") == approval:
                    return {"headers": got["headers"], "raw": raw, "body": body}
            time.sleep(0.2)
        raise AssertionError(f"the receiver got no {event} for {approval}")


def _signed(delivery: dict[str, Any]) -> bool:
    headers = {k.lower(): v for k, v in delivery["headers"].items()}
    return verify(
        SECRET.encode(),
        headers[TIMESTAMP_HEADER.lower()],
        delivery["raw"],
        headers[SIGNATURE_HEADER.lower()],
    )


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    scratch = tmp_path_factory.mktemp("expiry")
    state, inbox = scratch / "state", scratch / "inbox"
    inbox.mkdir()
    ensure_base_image()
    control_port = free_port()
    with (
        origin_namespace(scratch, ("expire", "tap")) as origin,
        webhook_receiver(origin, inbox) as hook_port,
        forwarded_port(origin, control_port) as phone_port,
    ):
        config = scratch / "appliance.yaml"
        console = f"http://127.0.0.1:{phone_port}"
        config.write_text(
            yaml.safe_dump(
                {
                    "notify": {
                        "one_tap": True,
                        "console_url": console,
                        "webhooks": [
                            {
                                "name": HOOK,
                                "url": f"http://127.0.0.1:{hook_port}/hook",
                                "events": ["approval.pending", "approval.expired"],
                                "format": "json",
                                "secret_env": "ONE_TAP_TEST_SECRET",
                            }
                        ],
                    }
                }
            )
        )
        env = cli_env(state, scratch)
        env.update(
            APPLIANCE_SYSTEM_CONFIG=str(config),
            APPLIANCE_CONTROL__PORT=str(control_port),
            ONE_TAP_TEST_SECRET=SECRET,
        )
        lab = Lab(scratch, state, env, origin, inbox, console)
        try:
            with running_control_plane(env, state, prefix=origin.in_namespace):
                try:
                    yield lab
                finally:
                    for name in sorted(lab.created):
                        with contextlib.suppress(Exception):
                            run_cli("sandbox", "rm", name, env=env)
        finally:
            for name in sorted(lab.created):
                force_remove_container(name)
                kill_proxies(name, state)


@pytest.fixture(scope="module")
def box(lab: Lab) -> str:
    name = f"expiry-{os.getpid()}"
    lab.created.add(name)
    argv = ["sandbox", "create", name, "--json", "--policy"]
    argv += [str(lab.policy_file("short.yaml", SHORT_HOLD_S)), "--", "python3", "-I", "-c"]
    out = json.loads(lab.cli(*argv, JOB_AGENT).stdout)
    assert out["state"] == "running"
    return name


def test_an_unanswered_request_expires(lab: Lab, box: str) -> None:
    host = "expire.origin.test"
    job = lab.request(box, f"http://{host}/late?token=SECRET")
    pending = lab.wait_pending(box, host)
    assert (pending["method"], pending["path"], pending["port"]) == ("GET", "/late", 80)
    shown = lab.cli("approvals", "list").stdout
    assert f"{pending['id']}  {box}  {host}:80  GET /late  expires in " in shown, shown
    assert pending["expires"] - pending["created"] == pytest.approx(SHORT_HOLD_S)
    assert 0 < pending["expires_in_s"] <= SHORT_HOLD_S

    result = lab.result(box, job)
    assert result.get("status") == 403, result
    assert f"expired: not answered within {SHORT_HOLD_S}s" in result["body"]
    # the control plane's expiry, not the proxy's backstop
    assert result["seconds"] < SHORT_HOLD_S + BACKSTOP_GRACE_S - 1, result

    (expired,) = lab.audit(event="approval.expired", approval=pending["id"])
    assert (expired["sandbox"], expired["host"], expired["port"]) == (box, host, 80)
    assert expired["actor"] == "expirer" and expired["actor_kind"] == "system"
    assert SHORT_HOLD_S - 0.5 <= expired["waited_s"] <= SHORT_HOLD_S + 2
    held = lab.audit(event="egress.held", approval=pending["id"])
    assert held and held[0]["expires"] == pending["expires"]

    late = lab.cli("approvals", "approve", pending["id"], ok=False)
    assert late.returncode == CONFLICT_EXIT and "already expired" in late.stderr, late.stderr
    assert "hint:" in late.stderr
    history = json.loads(lab.cli("approvals", "history", "--json").stdout)
    assert {"id": pending["id"], "decision": "expired", "actor": "expirer"}.items() <= history[
        0
    ].items()
    line = lab.cli("approvals", "history").stdout.splitlines()[0]
    assert f"{pending['id']}  expired   {box}  {host}:80  by expirer" in line, line

    told = lab.delivered("approval.expired", pending["id"])  # and notified, signed
    assert _signed(told) and told["body"]["waited_s"] >= SHORT_HOLD_S - 0.5


def test_a_one_tap_link_approves_once(lab: Lab, box: str) -> None:
    reloads = len(lab.audit(event="egress.policy_reloaded", sandbox=box))
    out = lab.cli(
        "sandbox", "policy", "set", box, "--policy", str(lab.policy_file("long.yaml", LONG_HOLD_S))
    )
    assert "applied" in out.stdout
    deadline = time.monotonic() + RESULT_TIMEOUT  # SIGHUP is asynchronous: wait for the reload
    while len(lab.audit(event="egress.policy_reloaded", sandbox=box)) <= reloads:
        assert time.monotonic() < deadline, "the proxy never reloaded its policy"
        time.sleep(0.1)
    host = "tap.origin.test"
    job = lab.request(box, f"http://{host}/tapped")
    pending = lab.wait_pending(box, host)
    assert pending["expires"] - pending["created"] == pytest.approx(LONG_HOLD_S)

    sent = lab.delivered("approval.pending", pending["id"])
    assert _signed(sent), sent["headers"]
    forged = dict(sent, raw=sent["raw"].replace(b"tap.origin.test", b"tap.origin.tesx"))
    assert not _signed(forged)  # the check is real
    link = sent["body"]["link"]
    assert link.startswith(f"{lab.console}/one-tap/"), link
    assert (sent["body"]["sandbox"], sent["body"]["host"]) == (box, host)

    with httpx.Client(timeout=30) as phone:
        page = phone.get(link)  # what a chat app's link preview does, too
        assert page.status_code == 200 and host in page.text and "Approve once" in page.text
        time.sleep(1.0)
        assert lab.wait_pending(box, host)["id"] == pending["id"]  # GET approved nothing
        assert job_result(lab.home(box), job, 0.1) is None

        tapped = phone.post(link, data={"confirm": "approve"})
        assert tapped.status_code == 200 and "Approved" in tapped.text, tapped.text

        result = lab.result(box, job)
        assert result.get("status") == 200, result
        assert result["body"] == f"origin {host} GET /tapped"
        (approved,) = lab.audit(event="control.approval.approved", approval=pending["id"])
        assert approved["actor"] == f"webhook:{HOOK}" and approved["actor_kind"] == "link"
        assert approved["persist"] is False

        again = phone.post(link, data={"confirm": "approve"})
        assert again.status_code == 409 and "already used" in again.text
        assert phone.get(link).status_code == 409
    assert len(lab.audit(event="control.approval.approved", approval=pending["id"])) == 1
    history = json.loads(lab.cli("approvals", "history", "--json").stdout)
    assert (history[0]["id"], history[0]["decision"]) == (pending["id"], "approved")
    assert history[0]["actor"] == f"webhook:{HOOK}"
    token = link.rsplit("/", 1)[1]
    assert token not in (lab.state / "audit" / "audit.jsonl").read_text()  # never logged
