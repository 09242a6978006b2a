"""The supervisor's agent socket (host → the runtime's loopback port) and the runtime's secret
env file, run for real on this host (tests/integration/supervisor_box.py); what the runtime
cannot touch of either, or of the check-in file."""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import free_port
from tests.integration.supervisor_box import (
    AGENT_UID,
    AS_ROOT,
    FAST,
    SLEEPER,
    UNUSABLE,
    Box,
    check_in,
    in_state,
    started_pid,
    stop,
    wait_for,
)

pytestmark = pytest.mark.integration

if UNUSABLE:
    pytest.skip(UNUSABLE, allow_module_level=True)


def http_server(port: int) -> str:
    return f"""
        import http.server, os
        class H(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                reply = f"{{os.getpid()}} {{self.path}} ".encode() + body
                self.send_response(200)
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)
            def log_message(self, *args): pass
        with open(os.path.join(os.environ["WS"], "pids"), "a") as f: f.write(f"{{os.getpid()}}\\n")
        http.server.ThreadingHTTPServer(("127.0.0.1", {port}), H).serve_forever()
    """


def post(path: Path, target: str, body: bytes) -> bytes:
    """One HTTP/1.0 POST over the unix socket; the raw answer (b"" when closed unanswered)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(path))
        head = f"POST {target} HTTP/1.0\r\nHost: runtime\r\nContent-Length: {len(body)}\r\n\r\n"
        s.sendall(head.encode() + body)
        got = b""
        while chunk := s.recv(65536):
            got += chunk
        return got


def socket_service(
    box: Box, port: int, peers: str = "any", **extra: Any
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The always-on keys and the agent's net rules for a runtime on `port`. `peers: any`: this
    supervisor is a plain process, it cannot tell the host from the sandbox (the peer rule:
    test_supervisor_peers.py, in a pid namespace)."""
    service = {
        "runtime": {"restart": "always", **FAST},
        "agent_socket": {"path": str(box.agent_socket), "port": port, "peers": peers},
        **extra,
    }
    # What policy `listen` compiles to: bind, never connect. PID 1 adds the connect in its own
    # domain (init.py `own_net`): every forwarded request here goes through that grant.
    net = {"connect_tcp": [box.port], "bind_tcp": [port]}
    return service, net


def test_the_agent_socket_forwards_http_to_the_runtime(box: Box) -> None:
    port = free_port()
    service, net = socket_service(box, port)
    box.start(box.config(http_server(port), service, net=net))
    st = wait_for("the socket", lambda: box.agent_socket.exists() and box.agent_socket.stat())
    assert st.st_mode & 0o777 == 0o600
    assert st.st_uid == (AGENT_UID if AS_ROOT else os.getuid())
    pid = started_pid(box, 1)
    # Until the runtime listens, a connection is closed without an answer (and without a reset).
    answer = wait_for("an answer", lambda: post(box.agent_socket, "/warm", b"x") or None)
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(f"{pid} /warm x".encode())
    results: dict[int, bool] = {}

    def one(i: int) -> None:
        body = bytes([65 + i]) * (200_000 + i)
        results[i] = post(box.agent_socket, f"/t{i}", body).endswith(f"/t{i} ".encode() + body)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert results == {i: True for i in range(6)}


def test_the_agent_socket_closes_cleanly_while_the_runtime_is_down(box: Box) -> None:
    port = free_port()
    service, net = socket_service(box, port, checkin={"path": str(box.checkin), "after_s": 5})
    proc = box.start(box.config(http_server(port), service, net=net))  # no check-in: waiting
    in_state(box, "waiting")
    for _ in range(3):
        assert post(box.agent_socket, "/", b"hello") == b""  # EOF, no ECONNRESET
    _rc, err = stop(proc)
    assert err.count(f"agent socket: cannot reach the runtime on 127.0.0.1:{port}") == 1


def test_a_stale_agent_socket_is_replaced_and_anything_else_refused(box: Box) -> None:
    port = free_port()
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(box.agent_socket))  # left by an earlier run: nobody listens on it
    stale.close()
    service, net = socket_service(box, port)
    first = box.start(box.config(http_server(port), service, net=net))
    started_pid(box, 1)
    assert wait_for("an answer", lambda: post(box.agent_socket, "/", b"x") or None)
    assert stop(first)[0] == 0
    box.agent_socket.unlink()
    box.agent_socket.write_text("not a socket")
    proc = box.popen(box.config(http_server(port), service, net=net))
    _out, err = proc.communicate(timeout=10)
    assert proc.returncode == 2 and "cannot bind the agent socket" in err


# -- the runtime's environment and what it cannot touch ------------------------------------------


def test_the_runtime_env_file_reaches_the_runtime_only(box: Box) -> None:
    token = secrets.token_urlsafe(24)
    box.runtime_env.write_text(json.dumps({"RUNTIME_TOKEN": token}))
    box.runtime_env.chmod(0o400)
    if AS_ROOT:
        os.chown(box.runtime_env, AGENT_UID, AGENT_UID)  # like paths.runtime_env
    code = """
        import os, time
        with open(os.path.join(os.environ["WS"], "env"), "w") as f:
            f.write(os.environ.get("RUNTIME_TOKEN", "-") + " " + os.environ["PATH"])
        with open(os.path.join(os.environ["WS"], "pids"), "a") as f: f.write(f"{os.getpid()}\\n")
        time.sleep(60)
    """
    service = {"runtime": {"restart": "always", **FAST}, "runtime_env_file": str(box.runtime_env)}
    cfg = box.config(code, service)
    proc = box.start(cfg)
    pid = started_pid(box, 1)
    assert (box.ws / "env").read_text() == f"{token} /usr/bin:/bin"
    for who in (pid, proc.pid):
        assert token.encode() not in Path(f"/proc/{who}/cmdline").read_bytes()
    # `init.py exec` (agent turns, `sandbox exec`) never gets the runtime's secrets.
    show = "import os; print(os.environ.get('RUNTIME_TOKEN', 'absent'))"
    env = {"APPLIANCE_SANDBOX_CONFIG": str(cfg), "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [*box.argv(), "exec", "--", "/usr/bin/python3", "-I", "-c", show],
        env=env,
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert out.returncode == 0 and out.stdout.strip() == "absent", out.stderr
    _rc, err = stop(proc)
    assert token not in err


@pytest.mark.parametrize("content", ["[1, 2]", '{"K": 3}', "not json {secret-value"])
def test_a_bad_runtime_env_file_exits_2_without_quoting_it(box: Box, content: str) -> None:
    box.runtime_env.write_text(content)
    service = {"runtime": {"restart": "always"}, "runtime_env_file": str(box.runtime_env)}
    proc = box.start(box.config(SLEEPER, service))
    _out, err = proc.communicate(timeout=10)
    assert proc.returncode == 2 and str(box.runtime_env) in err and "secret-value" not in err


def test_the_runtime_cannot_touch_the_checkin_or_the_agent_socket(box: Box) -> None:
    port = free_port()
    check_in(box)
    code = f"""
        import json, os, socket, time
        res = {{}}
        def attempt(name, op):
            try:
                op(); res[name] = "done"
            except OSError as exc:
                res[name] = exc.__class__.__name__
        checkin, sock = {str(box.checkin)!r}, {str(box.agent_socket)!r}
        attempt("checkin_write", lambda: open(checkin, "a").close())
        attempt("checkin_touch", lambda: os.utime(checkin))
        attempt("checkin_unlink", lambda: os.unlink(checkin))
        attempt("sock_unlink", lambda: os.unlink(sock))
        attempt("sock_rename", lambda: os.rename(sock, sock + ".moved"))
        attempt("sock_bind", lambda: socket.socket(socket.AF_UNIX).bind(sock + ".2"))
        out = os.path.join(os.environ["WS"], "tried")
        with open(out + ".tmp", "w") as f: json.dump(res, f)
        os.replace(out + ".tmp", out + ".json")
        time.sleep(60)
    """
    service, net = socket_service(box, port, checkin={"path": str(box.checkin), "after_s": 30})
    box.start(box.config(code, service, net=net))
    tried = box.ws / "tried.json"
    res = json.loads(wait_for("the attempts", lambda: tried.exists() and tried.read_text()))
    # The socket's directory is the agent uid's: only Landlock stands in the way there.
    assert res["sock_unlink"] == res["sock_rename"] == res["sock_bind"] == "PermissionError"
    assert box.agent_socket.exists()
    if AS_ROOT:  # the check-in file is root's, as on the host (and its mount is read-only)
        assert res["checkin_write"] == res["checkin_touch"] == "PermissionError"
        assert res["checkin_unlink"] == "PermissionError"
