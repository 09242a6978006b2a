"""Sandboxes, approvals and the kill switch through a real control plane (`appliance serve
control`, a subprocess) with real rootless Podman sandboxes and their egress proxies:

- concurrency is the control plane's: ten approvals of one pending request give one success and
  nine 409s (through the API, and through ten CLI processes: one exit 0, nine exit 10); five
  `sandbox create X` at once make one sandbox (four exit 10) and nothing half-made;
- the control plane killed with SIGKILL and started again: the same sandboxes, one live proxy
  each (a proxy that died meanwhile is restarted by the reconciler at start), the same pending
  approvals;
- the sandbox never reaches the control plane: its socket is not in the sandbox's mount
  namespace, its port is closed from the sandbox's network namespace, and the egress proxy
  refuses both, each probe with its specific refusal (and the same probes succeed on the host);
- hostile input through the API: bad names, policy errors -> 422 naming file:line, nothing made.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.control_fixtures import control_socket, running_control_plane
from tests.helpers import cli_env, free_port
from tests.sandbox_fixtures import (
    APPLIANCE,
    ensure_base_image,
    force_remove_container,
    kill_proxies,
    podman_client,
    proxy_pids,
    run_cli,
    sandbox_skip_reason,
    service_home,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

if (_why := sandbox_skip_reason()) is not None:
    pytest.skip(_why, allow_module_level=True)

POLICIES = Path(__file__).resolve().parents[2] / "sandbox" / "policies"
HOLD_SECONDS = 600  # held requests must outlive the whole module
CONFLICT_EXIT = 10

# The agent: holds one request per host named on its command line through the in-sandbox proxy
# port (each stays pending until an operator decides), then idles.
AGENT = r"""
import http.client, sys, threading, time
def fetch(host):
    try:
        c = http.client.HTTPConnection("127.0.0.1", 3128, timeout=900)
        c.request("GET", f"http://{host}/")
        print("DONE", host, c.getresponse().status, flush=True)
    except Exception as exc:
        print("DONE", host, repr(exc), flush=True)
for host in sys.argv[1:]:
    threading.Thread(target=fetch, args=(host,), daemon=True).start()
print("AGENT READY", flush=True)
time.sleep(10**6)
"""

# Run inside the sandbox (as the agent): each probe prints one JSON line with what happened.
PROBE = r"""
import json, os, socket, sys
sock_path, port = sys.argv[1], int(sys.argv[2])
out = {}
state_dir = os.path.dirname(os.path.dirname(sock_path))
for what, path in (("socket", sock_path), ("state_dir", state_dir), ("home", "/home/agent")):
    try:
        os.stat(path)
        out[what] = "exists"
    except OSError as exc:
        out[what] = type(exc).__name__
try:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(5)
    s.connect(sock_path)
    out["unix"] = "connected"
except OSError as exc:
    out["unix"] = type(exc).__name__
try:
    socket.create_connection(("127.0.0.1", port), timeout=5).close(); out["port"] = "connected"
except OSError as exc:
    out["port"] = type(exc).__name__
def via_proxy(raw):
    s = socket.create_connection(("127.0.0.1", 3128), timeout=30)
    s.sendall(raw)
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
        if b"\r\n\r\n" in data and len(data) > 4096:
            break
    s.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return {"status": int(head.split()[1]), "body": body.decode(errors="replace")[:300]}
hp = f"localhost:{port}"
get = f"GET http://{hp}/api/v1/status HTTP/1.1\r\nHost: {hp}\r\n\r\n"
out["proxy_get"] = via_proxy(get.encode())
out["proxy_connect"] = via_proxy(f"CONNECT {hp} HTTP/1.1\r\nHost: {hp}\r\n\r\n".encode())
target = "http+unix://" + sock_path.replace("/", "%2F") + "/api/v1/status"
out["proxy_unix"] = via_proxy(f"GET {target} HTTP/1.1\r\nHost: control\r\n\r\n".encode())
print(json.dumps(out))
"""


@dataclass
class Plane:
    """A control plane on a short private state dir (unix socket paths must stay <= 107 B)."""

    scratch: Path
    env: dict[str, str]
    port: int
    stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    proc: subprocess.Popen | None = None
    created: set[str] = field(default_factory=set)

    @property
    def state(self) -> Path:
        return self.scratch / "s"

    @property
    def socket(self) -> Path:
        return control_socket(self.state)

    def start(self) -> None:
        self.proc = self.stack.enter_context(running_control_plane(self.env, self.state))

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def cli(self, *args: str, ok: bool = True, timeout: float = 180):
        proc = run_cli(*args, env=self.env, timeout=timeout)
        if ok:
            assert proc.returncode == 0, f"appliance {' '.join(args)}: {proc.stderr}"
        assert "Traceback" not in proc.stderr, proc.stderr
        return proc

    def api(self) -> httpx.Client:
        return httpx.Client(
            transport=httpx.HTTPTransport(uds=str(self.socket)),
            base_url="http://control/api/v1",
            timeout=180,
        )

    def policy_file(self, name: str, **network: Any) -> Path:
        policy = yaml.safe_load((POLICIES / "default.yaml").read_text())
        policy["network"]["approval"] = {"mode": "hold", "hold_seconds": HOLD_SECONDS}
        policy["network"].update(network)
        path = self.scratch / f"{name}.yaml"
        path.write_text(yaml.safe_dump(policy, sort_keys=False))
        return path

    def create(self, name: str, *agent_args: str, policy: Path | None = None) -> None:
        self.created.add(name)
        command = ["--", "python3", "-I", "-c", AGENT, *agent_args] if agent_args else []
        policy = policy or self.policy_file(name)
        self.cli("sandbox", "create", name, "--policy", str(policy), *command)

    def states(self) -> dict[str, str]:
        rows = json.loads(self.cli("sandbox", "list", "--json").stdout)
        return {r["name"]: r["state"] for r in rows}

    def pending(self) -> list[dict[str, Any]]:
        return json.loads(self.cli("approvals", "list", "--json").stdout)

    def wait_pending(self, box: str, count: int, timeout: float = 60) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            mine = [p for p in self.pending() if p["sandbox"] == box]
            if len(mine) >= count:
                return mine
            time.sleep(0.3)
        raise AssertionError(f"{box}: fewer than {count} pending approvals after {timeout} s")


@pytest.fixture(scope="module")
def plane() -> Iterator[Plane]:
    ensure_base_image()
    scratch = Path(tempfile.mkdtemp(prefix="cs-"))
    env = cli_env(scratch / "s", scratch)
    port = free_port()
    env["APPLIANCE_CONTROL__PORT"] = str(port)  # on, on a free port: the probes try it
    p = Plane(scratch=scratch, env=env, port=port)
    try:
        p.start()
        yield p
    finally:
        if p.proc is not None and p.proc.poll() is None:
            for name in sorted(p.created):
                run_cli("sandbox", "rm", name, env=env)
        p.stack.close()
        for name in sorted(p.created):
            force_remove_container(name)
            kill_proxies(name, p.state)
        shutil.rmtree(scratch, ignore_errors=True)


@pytest.fixture(scope="module")
def holder(plane: Plane) -> str:
    """A sandbox whose agent holds four requests to unknown hosts: four pending approvals."""
    name = f"cs-hold-{os.getpid()}"
    hosts = [f"h{i}.pending.test" for i in range(4)]
    plane.create(name, *hosts)
    plane.wait_pending(name, len(hosts))
    return name


def _by_host(plane: Plane, box: str, host: str) -> dict[str, Any]:
    (found,) = [p for p in plane.pending() if p["sandbox"] == box and p["host"] == host]
    return found


def test_ten_api_approvals_of_one_request_one_wins(plane: Plane, holder: str) -> None:
    pending = _by_host(plane, holder, "h0.pending.test")
    barrier = threading.Barrier(10)
    answers: list[httpx.Response] = []
    lock = threading.Lock()

    def approve() -> None:
        with plane.api() as api:
            barrier.wait()
            response = api.post(f"/approvals/{pending['id']}/approve", json={"persist": False})
        with lock:
            answers.append(response)

    threads = [threading.Thread(target=approve) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    statuses = sorted(r.status_code for r in answers)
    assert statuses == [200] + [409] * 9, [(r.status_code, r.text) for r in answers]
    (won,) = [r.json() for r in answers if r.status_code == 200]
    assert won["id"] == pending["id"] and won["decision"] == "approved"
    assert won["sandbox"] == holder and won["host"] == "h0.pending.test" and won["rev"] is None
    for lost in (r.json()["error"] for r in answers if r.status_code == 409):
        assert (
            lost["type"] == "conflict"
            and f"{pending['id']} was already approved" in lost["message"]
        ), lost
    assert pending["id"] not in {p["id"] for p in plane.pending()}
    # an id nobody ever held is a 404, not a 409
    with plane.api() as api:
        unknown = api.post("/approvals/0badc0de/approve", json={})
    assert unknown.status_code == 404 and unknown.json()["error"]["type"] == "not_found"


def test_ten_cli_approvals_of_one_request_one_exit_zero(plane: Plane, holder: str) -> None:
    pending = _by_host(plane, holder, "h1.pending.test")
    argv = [APPLIANCE, "approvals", "approve", pending["id"]]
    procs = [
        subprocess.Popen(argv, env=plane.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(10)
    ]
    done = [(p.wait(120), p.stdout.read().decode(), p.stderr.read().decode()) for p in procs]
    for p in procs:
        p.stdout.close()
        p.stderr.close()
    codes = sorted(code for code, _, _ in done)
    assert codes == [0] + [CONFLICT_EXIT] * 9, done
    (winner,) = [out for code, out, _ in done if code == 0]
    assert f"approved {pending['id']} ({holder})" in winner
    for code, _out, err in done:
        if code == CONFLICT_EXIT:
            first, hint = err.splitlines()[:2]
            assert first.startswith(f"appliance: error: approval {pending['id']} was already")
            assert hint.startswith("  hint: ")


def test_five_parallel_creates_make_one_sandbox(plane: Plane) -> None:
    name = f"cs-race-{os.getpid()}"
    plane.created.add(name)
    policy = plane.policy_file(name)
    argv = [APPLIANCE, "sandbox", "create", name, "--policy", str(policy), "--json"]
    procs = [
        subprocess.Popen(argv, env=plane.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(5)
    ]
    done = [(p.wait(180), p.stdout.read().decode(), p.stderr.read().decode()) for p in procs]
    for p in procs:
        p.stdout.close()
        p.stderr.close()
    assert sorted(code for code, _, _ in done) == [0] + [CONFLICT_EXIT] * 4, done
    (made,) = [json.loads(out) for code, out, _ in done if code == 0]
    assert made["name"] == name and made["state"] == "running"
    for code, _out, err in done:
        if code == CONFLICT_EXIT:
            assert err.startswith(f"appliance: error: sandbox {name!r} exists"), err
    rows = [r for r in json.loads(plane.cli("sandbox", "list", "--json").stdout)]
    assert [(r["name"], r["state"], r["container"]) for r in rows if r["name"] == name] == [
        (name, "running", "running")
    ]
    containers = [c for c in podman_client().containers.list(all=True) if c.name == name]
    assert len(containers) == 1
    assert len(proxy_pids(name, plane.state)) == 1
    plane.cli("sandbox", "rm", name)
    assert not proxy_pids(name, plane.state)
    assert name not in {c.name for c in podman_client().containers.list(all=True)}


def test_hostile_input_through_the_api_is_422_and_makes_nothing(plane: Plane) -> None:
    good = (POLICIES / "default.yaml").read_text()
    before = json.loads(plane.cli("sandbox", "list", "--json").stdout)
    cases = {
        "../etc": good,
        "Bad Name": good,
        "x" * 64: good,
        "": good,
        "ok-name-but-yaml": "version: 1\nfilesystem:\n  read_write:\n    - /tmp\n   bad: [\n",
        "ok-name-bad-field": "version: 1\nfilesystem:\n  read_writ:\n    - /tmp\n",
    }
    with plane.api() as api:
        for name, text in cases.items():
            r = api.post("/sandboxes", json={"name": name, "policy": text, "source": "p.yaml"})
            assert r.status_code == 422, (name, r.status_code, r.text)
            error = r.json()["error"]
            assert set(error) == {"message", "type", "code", "hint"}, error
            if name.startswith("ok-name"):
                line = 5 if name.endswith("yaml") else 3
                assert error["message"].startswith(f"p.yaml:{line}"), error
            else:
                assert "invalid sandbox name" in error["message"], error
        too_big = api.post("/sandboxes", json={"name": "n", "policy": "x" * (2 << 20)})
        assert too_big.status_code == 422
    assert json.loads(plane.cli("sandbox", "list", "--json").stdout) == before
    home = service_home()
    for name in ("ok-name-but-yaml", "ok-name-bad-field"):
        assert not (plane.state / "sandboxes" / name).exists()
        assert home is None or not (home / "sandboxes" / name).exists()
        assert not proxy_pids(name, plane.state)


def test_hostile_input_on_an_existing_sandbox_changes_nothing(plane: Plane, holder: str) -> None:
    with plane.api() as api:
        before = api.get(f"/sandboxes/{holder}/policy").json()
        bad = api.put(
            f"/sandboxes/{holder}/policy",
            json={"policy": "version: 1\nnetwork: [\n", "source": "n.yaml"},
        )
        assert bad.status_code == 422 and bad.json()["error"]["message"].startswith("n.yaml:3")
        static = yaml.safe_load((POLICIES / "default.yaml").read_text())
        static["process"]["uid"] = 1234  # the static part is fixed at creation
        changed = api.put(
            f"/sandboxes/{holder}/policy", json={"policy": yaml.safe_dump(static), "source": "s"}
        )
        assert changed.status_code == 400, changed.text
        assert "only `network` can change" in changed.json()["error"]["message"]
        assert api.get(f"/sandboxes/{holder}/policy").json() == before
        not_b64 = api.post(f"/sandboxes/{holder}/exec", json={"argv": ["true"], "stdin": "%%"})
        assert not_b64.status_code == 422 and "not base64" in not_b64.json()["error"]["message"]
        assert api.post(f"/sandboxes/{holder}/exec", json={"argv": []}).status_code == 422
        for approval in ("..%2F..%2Fx", "ABCD", "f" * 65, "%2E%2E"):
            r = api.post(f"/approvals/{approval}/approve", json={})
            assert r.status_code == 404 and r.json()["error"]["type"] == "not_found", approval
        assert api.get("/sandboxes/%2E%2E").status_code == 404
        dots = api.delete("/sandboxes/%2E%2E")
        assert dots.status_code == 422 and "invalid sandbox name" in dots.json()["error"]["message"]
        assert api.post("/kill", json={"names": "not-a-list"}).status_code == 422
    assert plane.states()[holder] == "running"
    assert len(plane.wait_pending(holder, 2)) >= 2  # its held requests are still there


def test_the_sandbox_never_reaches_the_control_plane(plane: Plane) -> None:
    # On the host both ways in answer: the probes below can succeed where they are allowed.
    with socket.create_connection(("127.0.0.1", plane.port), timeout=5) as s:
        s.sendall(b"GET /api/v1/status HTTP/1.0\r\n\r\n")
        assert s.recv(12).startswith(b"HTTP/1.1 401")  # the port wants an operator token
    assert plane.socket.is_socket()

    name = f"cs-probe-{os.getpid()}"
    # Even a rule allowing localhost on the control port does not open it.
    plane.create(
        name, policy=plane.policy_file(name, allow=[{"host": "localhost", "ports": [plane.port]}])
    )
    try:
        proc = plane.cli(
            "sandbox", "exec", name, "--", "python3", "-I", "-c", PROBE,
            str(plane.socket), str(plane.port),
        )  # fmt: skip
        out = json.loads(proc.stdout)
        assert out["home"] == "exists"  # the stat probe works where there is something
        assert out["socket"] == "FileNotFoundError" and out["state_dir"] == "FileNotFoundError"
        assert out["unix"] == "FileNotFoundError"
        # its own network namespace, and its confinement lets it connect to the proxy port
        # only (EACCES: the probes through the proxy below do connect)
        assert out["port"] == "PermissionError"
        for probe in ("proxy_get", "proxy_connect"):
            assert out[probe]["status"] == 403, out
            assert "localhost resolves to a private or reserved address" in out[probe]["body"]
        assert out["proxy_unix"]["status"] == 400, out
        assert out["proxy_unix"]["body"] == "a proxy takes CONNECT or an absolute http:// URL\n"
    finally:
        plane.cli("sandbox", "rm", name)


def test_control_plane_sigkill_and_restart_recovers_everything(plane: Plane, holder: str) -> None:
    spare = f"cs-spare-{os.getpid()}"
    plane.create(spare)
    sandboxes = plane.states()
    pending = sorted(p["id"] for p in plane.pending())
    assert len(pending) >= 2 and {holder, spare} <= set(sandboxes)
    proxies = {name: proxy_pids(name, plane.state) for name in sandboxes}
    assert all(len(pids) == 1 for pids in proxies.values()), proxies

    plane.kill9()
    # While it is down: the CLI says so (exit 7, `appliance up`), and the spare's proxy dies.
    down = plane.cli("sandbox", "list", ok=False)
    assert down.returncode == 7 and "hint: start it with `appliance up`" in down.stderr
    os.kill(proxies[spare][0], signal.SIGKILL)
    assert plane.socket.exists()  # stale: the next control plane replaces it

    plane.start()
    deadline = time.monotonic() + 90  # the reconciler runs at start, in its own thread
    while len(proxy_pids(spare, plane.state)) != 1:
        assert time.monotonic() < deadline, "the dead proxy was never restarted"
        time.sleep(0.5)
    assert plane.states() == sandboxes
    assert sorted(p["id"] for p in plane.pending()) == pending
    assert proxy_pids(holder, plane.state) == proxies[holder]  # untouched: the same process
    assert proxy_pids(spare, plane.state) != proxies[spare]
    plane.cli("sandbox", "rm", spare)


def test_a_user_who_may_not_connect_is_told_so_not_that_it_is_down(plane: Plane) -> None:
    # The socket is 0660 root:appliance-admin (or root's alone) under a private state dir.
    # Config layers this user can look for (and not find); the state dir stays the plane's.
    env = {**plane.env, "HOME": "/", "XDG_CONFIG_HOME": "/nonexistent"}
    env["APPLIANCE_SYSTEM_CONFIG"] = "/nonexistent/config.yaml"
    proc = run_cli("sandbox", "list", env=env, user=65534)
    assert proc.returncode == 8, proc.stderr  # AuthError, not ControlPlaneDown's 7
    first, hint = proc.stderr.splitlines()[:2]
    assert first == f"appliance: error: permission denied on {plane.socket}", first
    assert hint == "  hint: run it as root or a member of the appliance-admin group"


def test_kill_hold_and_release_through_the_control_plane(plane: Plane) -> None:
    name = f"cs-kill-{os.getpid()}"
    plane.create(name)
    try:
        out = plane.cli("kill", name, "--hold")
        assert out.stdout.strip() == f"stopped: {name} · hold on"
        assert plane.states()[name] == "stopped" and not proxy_pids(name, plane.state)
        refused = plane.cli("sandbox", "start", name, ok=False)
        assert refused.returncode == CONFLICT_EXIT, refused.stderr
        assert "held by the kill switch" in refused.stderr
        unknown = plane.cli("kill", "no-such-box", ok=False)
        assert unknown.returncode == 1 and "no-such-box: no such sandbox" in unknown.stderr
        assert plane.cli("kill", ok=False).returncode == 2  # nothing named, no --all: usage
        assert plane.cli("release").stdout.strip() == "hold released"
        plane.cli("sandbox", "start", name)
        assert plane.states()[name] == "running" and len(proxy_pids(name, plane.state)) == 1
        audit = plane.state / "audit" / "audit.jsonl"
        events = [json.loads(line) for line in audit.read_text().splitlines() if line]
        kills = [e for e in events if e.get("event") == "control.kill"]
        assert kills[0]["sandboxes"] == [name] and kills[0]["hold"] is True
        assert kills[0]["actor_kind"] == "unix" and kills[0]["actor"] == f"uid:{os.geteuid()}"
        assert [e for e in events if e.get("event") == "release" and e.get("actor_kind") == "unix"]
    finally:
        plane.cli("release", ok=False)
        plane.cli("sandbox", "rm", name)
