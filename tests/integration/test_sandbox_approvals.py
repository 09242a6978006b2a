"""Egress approvals end to end: an agent in a real sandbox, the real per-sandbox proxy, and the
operator's `appliance approvals` / `sandbox policy set` commands run as subprocesses.

The agent (stdlib only, the sandbox's own command, under Landlock and seccomp) polls job files
that the test drops into its persistent home and makes each request through the in-sandbox
proxy port (127.0.0.1:3128 → the supervisor's forwarder → the host-side egress proxy), writing
the outcome back as a result file.

Why a network namespace (tests/integration/origin_namespace.py): an approval never opens a private
address, so the origin server has a public address in a namespace of its own, where the control
plane (which starts the proxies) runs too; every CLI command runs in the test's own namespaces, as
an operator's would, and reaches the control plane through its unix socket.
`test_approval_never_opens_a_private_address` pins the
private-address behaviour with a name that resolves to 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from sandbox.proxy.addresses import is_forbidden
from tests.control_fixtures import running_control_plane
from tests.helpers import cli_env
from tests.integration.origin_namespace import (
    JOB_AGENT,
    PUBLIC_IP,
    Origin,
    drop_job,
    origin_namespace,
)
from tests.integration.origin_namespace import (
    skip_reason as origin_skip_reason,
)
from tests.sandbox_fixtures import (
    ensure_base_image,
    force_remove_container,
    kill_proxies,
    podman_client,
    proxy_pids,
    run_cli,
    service_home,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

if (_why := origin_skip_reason()) is not None:
    pytest.skip(_why, allow_module_level=True)

POLICIES = Path(__file__).resolve().parents[2] / "sandbox" / "policies"
HOLD_SECONDS = 120  # generous: a held request must never time out while the test decides
RESULT_TIMEOUT = 45.0  # for a result once decided (slow 2-core machines)
PUBLIC_HOSTS = ("approve", "deny", "persist", "reload")


def base_policy() -> dict[str, Any]:
    policy = yaml.safe_load((POLICIES / "default.yaml").read_text())
    policy["network"]["approval"] = {"mode": "hold", "hold_seconds": HOLD_SECONDS}
    return policy


@dataclass
class Lab:
    scratch: Path
    state: Path
    env: dict[str, str]
    origin: Origin
    created: set[str] = field(default_factory=set)

    @property
    def audit_log(self) -> Path:
        return self.state / "audit" / "audit.jsonl"  # the hash-chained log

    def cli(self, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
        proc = run_cli(*args, env=self.env)
        if ok:
            assert proc.returncode == 0, f"appliance {' '.join(args)}: {proc.stderr}"
            assert "Traceback" not in proc.stderr
        return proc

    def write_policy(self, policy: dict[str, Any], name: str) -> Path:
        path = self.scratch / name
        path.write_text(yaml.safe_dump(policy, sort_keys=False))
        return path

    def create(self, name: str, policy_file: Path) -> dict[str, Any]:
        self.created.add(name)
        argv = ["sandbox", "create", name, "--policy", str(policy_file), "--json"]
        argv += ["--", "python3", "-I", "-c", JOB_AGENT]
        proc = run_cli(*argv, env=self.env, timeout=180)
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout)
        assert out["state"] == "running" and out["enforcement"]["agent_started"] is True
        return out

    def remove(self, name: str) -> None:
        self.cli("sandbox", "rm", name)

    def home(self, name: str) -> Path:
        home = service_home()
        assert home is not None
        return home / "homes" / name  # SandboxPaths.home: outlives the sandbox dir

    def request(self, box: str, url: str, method: str = "GET", body: str | None = None) -> str:
        """Hand the agent one request; returns the job id."""
        return drop_job(self.home(box), url, method, body)

    def result_path(self, box: str, job: str) -> Path:
        return self.home(box) / f"{job}.result"

    def result(self, box: str, job: str, timeout: float = RESULT_TIMEOUT) -> dict[str, Any]:
        path = self.result_path(box, job)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if path.is_file():
                return json.loads(path.read_text())
            time.sleep(0.1)
        logs = self.cli("sandbox", "logs", box, ok=False).stdout
        raise AssertionError(f"no result for job {job} in {timeout:.0f} s; logs:\n{logs[-2000:]}")

    def pending(self) -> list[dict[str, Any]]:
        return json.loads(self.cli("approvals", "list", "--json").stdout)

    def wait_pending(self, box: str, host: str, timeout: float = RESULT_TIMEOUT) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for p in self.pending():
                if p["sandbox"] == box and p["host"] == host:
                    return p
            time.sleep(0.3)
        raise AssertionError(f"no pending approval for {host} from {box} in {timeout:.0f} s")

    def audit(self, **match: Any) -> list[dict[str, Any]]:
        if not self.audit_log.is_file():
            return []
        records = [json.loads(line) for line in self.audit_log.read_text().splitlines() if line]
        return [r for r in records if all(r.get(k) == v for k, v in match.items())]

    def policy(self, box: str) -> tuple[int, dict[str, Any]]:
        out = json.loads(self.cli("sandbox", "policy", "show", box, "--json").stdout)
        return out["rev"], out["policy"]


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    assert not is_forbidden(PUBLIC_IP), "the test needs an address the proxy treats as public"
    scratch = tmp_path_factory.mktemp("approvals")
    state = scratch / "state"
    ensure_base_image()  # also starts the service user's podman outside the test namespace
    with origin_namespace(scratch, PUBLIC_HOSTS) as origin:
        lab = Lab(scratch=scratch, state=state, env=cli_env(state, scratch), origin=origin)
        try:
            with running_control_plane(lab.env, state, prefix=origin.in_namespace):
                try:
                    yield lab
                finally:
                    for name in sorted(lab.created):
                        with contextlib.suppress(Exception):
                            run_cli("sandbox", "rm", name, env=lab.env)
        finally:
            for name in sorted(lab.created):
                force_remove_container(name)
                kill_proxies(name, state)


@pytest.fixture(scope="module")
def box(lab: Lab) -> Iterator[str]:
    name = f"appr-{os.getpid()}"
    lab.create(name, lab.write_policy(base_policy(), "box.yaml"))
    try:
        yield name
    finally:
        lab.remove(name)


def test_held_request_completes_after_approve(lab: Lab, box: str) -> None:
    rev_before, _ = lab.policy(box)
    job = lab.request(box, "http://approve.origin.test/a?x=1")
    pending = lab.wait_pending(box, "approve.origin.test")
    assert pending["port"] == 80
    time.sleep(1.0)
    assert not lab.result_path(box, job).exists(), "the request was not held"

    out = lab.cli("approvals", "approve", pending["id"])
    assert f"approved {pending['id']} ({box})" in out.stdout
    result = lab.result(box, job)
    assert result.get("status") == 200, result
    assert result["body"] == "origin approve.origin.test GET /a?x=1"
    assert result["seconds"] >= 1.0  # it waited for the operator
    assert all(p["id"] != pending["id"] for p in lab.pending())
    assert lab.audit(event="egress.held", sandbox=box, host="approve.origin.test")
    assert lab.audit(event="egress.approved", sandbox=box, approval=pending["id"], persist=False)
    assert lab.policy(box)[0] == rev_before  # no --persist: no new revision

    # approved for this proxy's life: the next request passes without a hold
    again = lab.result(box, lab.request(box, "http://approve.origin.test/b"))
    assert again.get("status") == 200 and again["body"].endswith("GET /b"), again
    assert len(lab.audit(event="egress.held", sandbox=box, host="approve.origin.test")) == 1


def test_held_request_denied_gets_403(lab: Lab, box: str) -> None:
    job = lab.request(box, "http://deny.origin.test/secret")
    pending = lab.wait_pending(box, "deny.origin.test")
    assert not lab.result_path(box, job).exists()

    out = lab.cli("approvals", "deny", pending["id"])
    assert f"denied {pending['id']} ({box})" in out.stdout
    result = lab.result(box, job)
    assert result.get("status") == 403, result
    assert "denied by operator" in result["body"]
    assert "origin" not in result["body"].split()  # never reached the server
    assert lab.audit(event="egress.rejected", sandbox=box, approval=pending["id"])

    # a decided id: deciding it again is a conflict (exit 10) naming the decision, no traceback
    again = lab.cli("approvals", "approve", pending["id"], ok=False)
    assert again.returncode == 10 and "Traceback" not in again.stderr, again.stderr
    assert f"approval {pending['id']} was already denied ({box}" in again.stderr
    # and an id no proxy ever held is not found (exit 5)
    unknown = lab.cli("approvals", "deny", "0badc0de", ok=False)
    assert unknown.returncode == 5 and "no pending approval '0badc0de'" in unknown.stderr


def test_approval_never_opens_a_private_address(lab: Lab, box: str) -> None:
    # private.origin.test resolves to 127.0.0.1, where the origin server does listen.
    job = lab.request(box, "http://private.origin.test/")
    pending = lab.wait_pending(box, "private.origin.test")
    lab.cli("approvals", "approve", pending["id"])
    result = lab.result(box, job)
    assert result.get("status") == 403, result
    assert "resolves to a private or reserved address" in result["body"]


def _container_identity(name: str) -> dict[str, Any]:
    container = podman_client().containers.get(name)
    state = container.attrs["State"]
    pid = int(state["Pid"])
    assert b"supervisor/init.py" in Path(f"/proc/{pid}/cmdline").read_bytes()  # PID 1
    stat = Path(f"/proc/{pid}/stat").read_text()
    return {
        "id": container.id,
        "started": state["StartedAt"],
        "pid": pid,
        "pid_start": stat.rsplit(")", 1)[1].split()[19],  # field 22: start time in ticks
        "restarts": container.attrs.get("RestartCount", 0),
        "status": state["Status"],
    }


def test_policy_set_hot_reloads_without_restart(lab: Lab, box: str) -> None:
    host = "reload.origin.test"
    # Before: an unknown host, so it is held (and the operator denies it).
    first = lab.request(box, f"http://{host}/before")
    lab.cli("approvals", "deny", lab.wait_pending(box, host)["id"])
    assert lab.result(box, first).get("status") == 403

    before = _container_identity(box)
    assert before["status"] == "running"
    rev_before, _ = lab.policy(box)
    reloads = len(lab.audit(event="egress.policy_reloaded", sandbox=box))
    held = len(lab.audit(event="egress.held", sandbox=box, host=host))

    policy = base_policy()
    policy["network"]["allow"] = [{"host": host, "ports": [80], "access": "read-only"}]
    new_file = lab.write_policy(policy, "reload.yaml")
    out = lab.cli("sandbox", "policy", "set", box, "--policy", str(new_file))
    assert f"policy revision {rev_before + 1} applied" in out.stdout
    deadline = time.monotonic() + RESULT_TIMEOUT  # SIGHUP is asynchronous: wait for the reload
    while len(lab.audit(event="egress.policy_reloaded", sandbox=box)) <= reloads:
        assert time.monotonic() < deadline, "the proxy never reloaded its policy"
        time.sleep(0.1)

    get = lab.result(box, lab.request(box, f"http://{host}/after"))
    assert get.get("status") == 200 and get["body"] == f"origin {host} GET /after", get
    assert get["seconds"] < HOLD_SECONDS / 4
    post = lab.result(box, lab.request(box, f"http://{host}/after", "POST", "x"))
    assert post.get("status") == 403 and "POST /after" in post["body"], post  # read-only rule
    assert len(lab.audit(event="egress.held", sandbox=box, host=host)) == held  # no new hold

    rev, stored = lab.policy(box)
    assert rev == rev_before + 1
    assert [e["host"] for e in stored["network"]["allow"]] == [host]
    assert _container_identity(box) == before  # same container, same PID 1, never restarted


def test_persisted_approval_survives_recreate(lab: Lab) -> None:
    name = f"appr-persist-{os.getpid()}"
    host = "persist.origin.test"
    original = lab.write_policy(base_policy(), "persist.yaml")
    lab.create(name, original)
    try:
        rev1, _ = lab.policy(name)
        job = lab.request(name, f"http://{host}/one")
        pending = lab.wait_pending(name, host)
        out = lab.cli("approvals", "approve", pending["id"], "--persist")
        assert f"approved {pending['id']} ({name}); policy revision {rev1 + 1}" in out.stdout
        result = lab.result(name, job)
        assert result.get("status") == 200 and result["body"] == f"origin {host} GET /one"

        rev2, stored = lab.policy(name)
        assert rev2 == rev1 + 1
        assert {"host": host, "ports": [80]}.items() <= stored["network"]["allow"][0].items()

        lab.remove(name)
        assert not proxy_pids(name, lab.state)
        assert name not in {c.name for c in podman_client().containers.list(all=True)}

        lab.create(name, original)  # the original file does not name the host
        held = len(lab.audit(event="egress.held", sandbox=name, host=host))
        again = lab.result(name, lab.request(name, f"http://{host}/two"))
        assert again.get("status") == 200 and again["body"] == f"origin {host} GET /two", again
        assert again["seconds"] < HOLD_SECONDS / 4
        assert len(lab.audit(event="egress.held", sandbox=name, host=host)) == held
        assert not [p for p in lab.pending() if p["sandbox"] == name]
        rev3, carried = lab.policy(name)
        assert rev3 == rev2 + 1
        assert host in [e["host"] for e in carried["network"]["allow"]]
    finally:
        with contextlib.suppress(Exception):
            lab.remove(name)


def test_recreate_keeps_the_deny_rules_it_inherits(lab: Lab) -> None:
    name = f"appr-deny-{os.getpid()}"
    host = "deny.origin.test"
    policy = base_policy()
    policy["network"]["allow"] = [{"host": "*.origin.test", "ports": [80]}]
    original = lab.write_policy(policy, "wildcard.yaml")
    lab.create(name, original)
    try:
        assert lab.result(name, lab.request(name, f"http://{host}/")).get("status") == 200
        policy["network"]["deny"] = [{"host": host, "ports": [80]}]
        reloads = len(lab.audit(event="egress.policy_reloaded", sandbox=name))
        lab.cli(
            "sandbox", "policy", "set", name, "--policy", str(lab.write_policy(policy, "d.yaml"))
        )
        deadline = time.monotonic() + RESULT_TIMEOUT
        while len(lab.audit(event="egress.policy_reloaded", sandbox=name)) <= reloads:
            assert time.monotonic() < deadline, "the proxy never reloaded its policy"
            time.sleep(0.1)
        denied = lab.result(name, lab.request(name, f"http://{host}/"))
        assert denied.get("status") == 403 and "denied by policy" in denied["body"], denied

        lab.remove(name)
        lab.create(name, original)  # inherits the latest revision: its allows *and* its denies
        _rev, inherited = lab.policy(name)
        assert host in [e["host"] for e in inherited["network"]["deny"]], inherited["network"]
        after = lab.result(name, lab.request(name, f"http://{host}/"))
        assert after.get("status") == 403, after
    finally:
        with contextlib.suppress(Exception):
            lab.remove(name)
