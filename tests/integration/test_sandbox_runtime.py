"""An always-on runtime in a real rootless sandbox: the host drives it over the agent socket, it
fails closed when the control plane stops checking in and comes back on the next check-in, and
the agent inside cannot touch the socket, the check-in or the token file.

The runtime is a stdlib HTTP server on the sandbox's loopback (what `kind: command` with `serve:`
runs): it answers 200 only to `Authorization: Bearer $AGENT_TOKEN`, and says which sandbox it is.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from sandbox.lifecycle.errors import SandboxError
from sandbox.lifecycle.manager import SandboxManager, read_policy_file
from sandbox.lifecycle.ports import RuntimeService
from sandbox.lifecycle.runtime import PARK_TIMEOUT_S
from sandbox.policy import Policy
from sandbox.supervisor.timing import STOP_GRACE_S
from tests.sandbox_fixtures import ensure_base_image, sandbox_manager, sandbox_skip_reason
from tests.security.test_escape_battery import POLICIES

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PORT = 8080
FAIL_CLOSED_AFTER = 15
SERVICE = RuntimeService(port=PORT, token_env="AGENT_TOKEN", fail_closed_after=FAIL_CLOSED_AFTER)
SERVER = f"""
import http.server, json, os, socket
TOKEN = os.environ.get("AGENT_TOKEN")
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        ok = bool(TOKEN) and self.headers.get("Authorization") == "Bearer " + TOKEN
        body = json.dumps({{"ok": ok, "host": socket.gethostname(), "pid": os.getpid()}})
        self.send_response(200 if ok else 401)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", {PORT}), Handler).serve_forever()
"""
COMMAND = ["python3", "-c", SERVER]
IGNORE_SIGTERM = "import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
IGNORES_SIGTERM = ["python3", "-c", IGNORE_SIGTERM + SERVER]


@pytest.fixture(scope="module")
def manager() -> Iterator[SandboxManager]:
    if (why := sandbox_skip_reason()) is not None:
        pytest.skip(why)
    ensure_base_image()
    with sandbox_manager("rt-") as m:
        yield m


def _name(tag: str) -> str:
    return f"rt-{tag}-{os.getpid()}"


def _policy() -> Policy:
    data = read_policy_file(POLICIES / "default.yaml").model_dump(mode="json")
    data["process"]["listen"] = [PORT]
    return Policy.model_validate(data)


def _ask(manager: SandboxManager, name: str, token: str | None) -> httpx.Response:
    transport = httpx.HTTPTransport(uds=str(manager.agent_socket(name)))
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with httpx.Client(transport=transport, timeout=5) as client:
        return client.get("http://runtime/", headers=headers)


def _answer(manager: SandboxManager, name: str, within: float = 30.0) -> dict[str, Any]:
    """The runtime's answer to the right token, once it answers (it starts in ~0.1 s)."""
    deadline = time.monotonic() + within
    while True:
        try:
            response = _ask(manager, name, manager.runtime_token(name))
            if response.status_code == 200:
                return response.json()
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"no answer over the agent socket: {manager.runtime_state(name)}")
        time.sleep(0.2)


def _state(manager: SandboxManager, name: str) -> str | None:
    return (manager.runtime_state(name) or {}).get("state")


def _wait_state(manager: SandboxManager, name: str, want: str, within: float) -> float:
    start = time.monotonic()
    while _state(manager, name) != want:
        assert time.monotonic() - start < within, (want, manager.runtime_state(name))
        time.sleep(0.2)
    return time.monotonic() - start


def test_the_host_drives_the_runtime_over_the_agent_socket(manager: SandboxManager) -> None:
    name = _name("drive")
    manager.create(name, _policy(), COMMAND, service=SERVICE)
    paths = manager.paths(name)

    answer = _answer(manager, name)
    assert answer["ok"] is True and answer["host"] == name
    assert _ask(manager, name, None).status_code == 401
    assert _ask(manager, name, "not-the-token").status_code == 401
    state = manager.runtime_state(name)
    assert state is not None and state["state"] == "running"
    assert state["fail_closed_after"] == FAIL_CLOSED_AFTER

    config = json.loads((paths.config / "sandbox.json").read_text())
    assert config["agent_socket"] == {"path": "/run/appliance/sock/agent.sock", "port": PORT}
    assert config["checkin"]["after_s"] == FAIL_CLOSED_AFTER
    assert config["landlock"]["net"] == {"connect_tcp": [3128], "bind_tcp": [PORT]}
    # The token is in two files only: never in the container's argv or environment.
    token = manager.runtime_token(name)
    assert token and len(token) >= 43
    attrs = manager.container(name).attrs
    assert token not in json.dumps(attrs) and token not in json.dumps(config)
    assert sorted(p.name for p in paths.sock.iterdir()) == ["agent.sock"]

    # A re-created sandbox gets a fresh token; the old one no longer opens the runtime.
    manager.remove(name)
    assert not paths.root.exists() and not paths.runtime_token.exists()
    manager.create(name, _policy(), COMMAND, service=SERVICE)
    assert _answer(manager, name)["ok"] is True
    assert manager.runtime_token(name) != token
    assert _ask(manager, name, token).status_code == 401


def _probe(manager: SandboxManager, name: str, script: str) -> dict[str, Any]:
    code, out, err = manager.exec(name, ["python3", "-c", script])
    assert code == 0, (code, out, err)
    return json.loads(out)


PROBES = r"""
import errno, json, os, socket, sys
results = {}
def attempt(label, fn):
    try:
        value = fn()
        results[label] = "ok" if value is None else value
    except OSError as exc:
        results[label] = errno.errorcode.get(exc.errno, str(exc.errno))
def ask_over(path_or_addr):
    family = socket.AF_UNIX if isinstance(path_or_addr, str) else socket.AF_INET
    s = socket.socket(family)
    s.settimeout(5)
    s.connect(path_or_addr)
    s.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    if not data:
        return "closed"
    head, _, body = data.partition(b"\r\n\r\n")
    return [head.split()[1].decode(), json.loads(body)["host"]]
def unix_connect(path):
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
def unix_bind(path):
    socket.socket(socket.AF_UNIX).bind(path)
cfg, sock = "/run/appliance/config", "/run/appliance/sock"
attempt("write_checkin", lambda: open(cfg + "/checkin", "w").close())
attempt("touch_checkin", lambda: os.utime(cfg + "/checkin"))
attempt("read_env", lambda: open(cfg + "/runtime-env.json").read())
attempt("unlink_socket", lambda: os.unlink(sock + "/agent.sock"))
attempt("move_socket_away", lambda: os.rename(sock + "/agent.sock", sock + "/old.sock"))
attempt("symlink_into_sock", lambda: os.symlink("/tmp", sock + "/evil.sock"))
attempt("mkdir_in_sock", lambda: os.mkdir(sock + "/evil"))
attempt("bind_into_sock", lambda: unix_bind(sock + "/evil.sock"))
attempt("list_sock", lambda: os.listdir(sock))
attempt("control_socket", lambda: unix_connect(sys.argv[1]))
attempt("other_agent_socket", lambda: unix_connect(sys.argv[2]))
attempt("own_agent_socket", lambda: ask_over(sock + "/agent.sock"))
attempt("own_loopback", lambda: ask_over(("127.0.0.1", 8080)))
attempt("token_in_env", lambda: "AGENT_TOKEN" in os.environ)
print(json.dumps(results))
"""


def test_the_agent_cannot_touch_the_socket_the_checkin_or_the_token(
    manager: SandboxManager,
) -> None:
    name, other = _name("inside"), _name("other")
    for n in (name, other):
        manager.create(n, _policy(), COMMAND, service=SERVICE)
        _answer(manager, n)
    # A live control socket on the host, where the control plane keeps it.
    control = manager.settings.state_dir / "run" / "control.sock"
    control.parent.mkdir(exist_ok=True)
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(control))
    listener.listen()
    try:
        script = PROBES.replace("sys.argv[1]", repr(str(control))).replace(
            "sys.argv[2]", repr(str(manager.agent_socket(other)))
        )
        results = _probe(manager, name, script)
    finally:
        listener.close()
    # The check-in is in the read-only config mount (and root's); the rest Landlock refuses.
    assert results["write_checkin"] == results["touch_checkin"] == "EROFS", results
    for probe in ("read_env", "unlink_socket", "move_socket_away", "symlink_into_sock"):
        assert results[probe] == "EACCES", (probe, results)
    for probe in ("mkdir_in_sock", "bind_into_sock", "list_sock"):
        assert results[probe] == "EACCES", (probe, results)
    # Neither the host's control socket nor another sandbox's agent socket exists in here.
    assert results["control_socket"] == "ENOENT", results
    assert results["other_agent_socket"] == "ENOENT", results
    # Nor can it drive its own runtime: Landlock refuses a connect to the runtime's port (the
    # agent's domain may only bind it), and PID 1 closes the agent socket unanswered for any
    # peer inside the sandbox, counting it. The host still drives the runtime.
    assert results["own_agent_socket"] in ("closed", "ECONNRESET", "EPIPE"), results
    assert results["own_loopback"] == "EACCES", results
    _wait_refused(manager, name, 1)
    assert results["token_in_env"] is False, results  # `exec` never gets the runtime's env
    # Nothing was changed: the socket is there and the runtime still answers.
    assert sorted(p.name for p in manager.paths(name).sock.iterdir()) == ["agent.sock"]
    assert _answer(manager, name)["host"] == name


def _wait_refused(manager: SandboxManager, name: str, count: int) -> None:
    """PID 1 counts refusals into its report on its next tick (0.5 s)."""
    want = {"peers": "outside", "refused": count}
    deadline = time.monotonic() + 5
    while (manager.enforcement(name) or {}).get("agent_socket") != want:
        assert time.monotonic() < deadline, ("refusals", want, manager.enforcement(name))
        time.sleep(0.1)


def test_fails_closed_without_checkins_and_comes_back(manager: SandboxManager) -> None:
    name = _name("silent")
    manager.create(name, _policy(), COMMAND, service=SERVICE)
    checkin = manager.paths(name).checkin
    first = _answer(manager, name)

    # Checking in every 3 s keeps it up past fail_closed_after.
    until = time.monotonic() + FAIL_CLOSED_AFTER + 5
    while time.monotonic() < until:
        manager.checkin(name)
        time.sleep(3)
        assert _state(manager, name) == "running", manager.runtime_state(name)
    assert _answer(manager, name)["pid"] == first["pid"]

    # Then silence: stopped within fail_closed_after + 10 s of the last check-in.
    manager.checkin(name)
    last = checkin.stat().st_mtime
    _wait_state(manager, name, "fail_closed", FAIL_CLOSED_AFTER + 12)
    silent_for = time.time() - last
    assert FAIL_CLOSED_AFTER - 1 <= silent_for <= FAIL_CLOSED_AFTER + 10, silent_for
    state = manager.runtime_state(name)
    assert state is not None and state["fail_closed_at"], state
    with pytest.raises((httpx.TransportError, httpx.HTTPStatusError)):
        _ask(manager, name, manager.runtime_token(name)).raise_for_status()
    print(f"\nfail-closed {silent_for:.1f} s after the last check-in (after_s={FAIL_CLOSED_AFTER})")

    # The next check-in brings it back: a new process, the same token.
    t0 = time.monotonic()
    manager.checkin(name)
    again = _answer(manager, name, within=15)
    print(f"back {time.monotonic() - t0:.1f} s after the check-in")
    assert again["ok"] is True and again["pid"] != first["pid"]
    assert _state(manager, name) == "running"


def test_park_keeps_the_state_and_reconcile_brings_it_back(manager: SandboxManager) -> None:
    from appliance.store.inference_store import InferenceStore

    name = _name("park")
    manager.create(name, _policy(), COMMAND, service=SERVICE)
    _answer(manager, name)
    checkin = manager.paths(name).checkin

    manager.park(name, "control plane stopping")
    container = manager.container(name)
    assert container.status in ("exited", "stopped")
    assert manager.boxes.get(name).state == "running"  # what should run, still
    assert manager._proxy_running(manager.paths(name)) is None
    with InferenceStore(manager.settings.state_dir) as store:
        parked = store.audit_events("sandbox.parked")
    assert [(e["sandbox"], e["reason"]) for e in parked] == [(name, "control plane stopping")]

    time.sleep(1.1)  # a check-in at the restart must move the mtime
    parked_at = checkin.stat().st_mtime
    out = manager.reconcile()
    assert name in out.restarted, out
    assert checkin.stat().st_mtime > parked_at  # checked in before the container started
    assert _answer(manager, name)["ok"] is True

    # Held by the kill switch: a parked sandbox stays down.
    manager.park(name, "again")
    manager.boxes.hold("test")
    try:
        out = manager.reconcile()
    finally:
        manager.boxes.release()
    assert name in out.stopped and name not in out.restarted
    with pytest.raises(httpx.TransportError):  # nothing listens on the socket left behind
        _ask(manager, name, manager.runtime_token(name))


def test_park_outlasts_a_runtime_that_ignores_sigterm(manager: SandboxManager) -> None:
    """Parking gives PID 1 the time of its own stop (SIGTERM to the runtime's group, SIGKILL
    after stop_grace_s): the report then says `stopped`, never `running` with a dead pid; the
    next start's report is the new run's."""
    name = _name("stubborn")
    manager.create(name, _policy(), IGNORES_SIGTERM, service=SERVICE)
    _answer(manager, name)
    t0 = time.monotonic()
    manager.park(name, "control plane stopping")
    took = time.monotonic() - t0
    state = manager.runtime_state(name)
    assert state is not None and state["state"] == "stopped" and state["pid"] is None, state
    assert state["last_exit"]["signal"] == signal.SIGKILL, state
    assert STOP_GRACE_S - 1 <= took <= PARK_TIMEOUT_S + 2, took

    manager.start(name)
    assert _answer(manager, name)["ok"] is True
    state = manager.runtime_state(name)
    assert state is not None and state["state"] == "running" and state["starts"] == 1, state


def test_start_checks_in_before_the_container_starts(manager: SandboxManager) -> None:
    """Without a fresh check-in a runtime waits (fail closed from the start); `start` checks in
    first, so a sandbox stopped longer than fail_closed_after starts with its runtime up."""
    name = _name("start")
    manager.create(name, _policy(), COMMAND, service=SERVICE)
    paths = manager.paths(name)
    stale = time.time() - 3600  # as after a long stop

    manager.stop(name, timeout=1)
    os.utime(paths.checkin, (stale, stale))
    (paths.report / "enforcement.json").unlink()
    container = manager.container(name)
    container.start()  # behind the manager's back: no check-in
    report = manager._wait_report(paths, container)  # a waiting runtime counts as started
    assert report["runtime"]["state"] == "waiting", report["runtime"]
    with pytest.raises(httpx.TransportError):  # the forwarder finds nothing on the port
        _ask(manager, name, manager.runtime_token(name))
    manager.checkin(name)
    assert _answer(manager, name, within=10)["ok"] is True

    manager.stop(name, timeout=1)
    os.utime(paths.checkin, (stale, stale))
    manager.start(name)
    assert _answer(manager, name, within=10)["ok"] is True
    assert paths.checkin.stat().st_mtime > stale + 3000


def test_a_failed_create_leaves_no_service_file(manager: SandboxManager) -> None:
    name = _name("undone")
    with pytest.raises(SandboxError, match=r"process\.listen"):
        manager.create(name, read_policy_file(POLICIES / "default.yaml"), COMMAND, service=SERVICE)
    assert manager.boxes.get(name) is None and not manager.paths(name).root.exists()

    with pytest.raises(Exception):  # noqa: B017 - whatever Podman says; nothing may remain
        manager.create(
            name, _policy(), COMMAND, image="localhost/no-such-image:never", service=SERVICE
        )
    paths = manager.paths(name)
    assert manager.boxes.get(name) is None
    for gone in (paths.root, paths.sock, paths.checkin, paths.runtime_env, paths.runtime_token):
        assert not gone.exists(), gone
