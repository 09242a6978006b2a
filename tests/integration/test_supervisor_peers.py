"""Who may drive the runtime, run for real on this host (tests/integration/supervisor_box.py).

With the supervisor as PID 1 of its own pid namespace (unshare(1), as in a sandbox), the host
drives the runtime over the agent socket, while nothing inside can: the runtime and its tools
(the agent's Landlock domain) may bind the runtime's port but not connect to it, and the agent
socket refuses every peer inside the namespace (SO_PEERCRED pid != 0), an `exec`'d one too. PID 1
itself connects to the port from its own domain (init.py `own_net`): the host's answers prove it.
"""

from __future__ import annotations

import json
import socket
import subprocess

import pytest

from tests.helpers import free_port
from tests.integration.supervisor_box import (
    FAST,
    NO_PID_NS,
    UNUSABLE,
    Box,
    stop,
    supervisor_pid,
    wait_for,
)
from tests.integration.test_supervisor_socket_env import socket_service

pytestmark = pytest.mark.integration

if UNUSABLE:
    pytest.skip(UNUSABLE, allow_module_level=True)

REFUSED_LINE = "agent socket: connection refused: pid "
# A runtime on PORT that first tries, from inside its own domain, its own port and 3 times the
# agent socket; it writes what happened to ws/tried.json, then serves.
RUNTIME = """
    import errno, http.server, json, os, socket, threading, time
    PORT, SOCK = {port}, {sock!r}
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = f"runtime {{os.getpid()}}".encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        def log_message(self, *args): pass
    server = http.server.ThreadingHTTPServer(("127.0.0.1", PORT), H)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    res = {{}}
    def attempt(name, op):
        try:
            res[name] = op()
        except OSError as exc:
            res[name] = errno.errorcode.get(exc.errno, str(exc))
    def own_port():
        socket.create_connection(("127.0.0.1", PORT), timeout=5).close()
        return "connected"
    def agent_socket():
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(5)
        s.connect(SOCK)
        s.sendall(b"GET / HTTP/1.0\\r\\nHost: x\\r\\n\\r\\n")
        got = b""
        while chunk := s.recv(65536):
            got += chunk
        return got.decode() or "closed"
    attempt("own_port", own_port)
    for i in range(3):
        attempt(f"agent_socket_{{i}}", agent_socket)
    out = os.path.join(os.environ["WS"], "tried")
    with open(out + ".tmp", "w") as f: json.dump(res, f)
    os.replace(out + ".tmp", out + ".json")
    time.sleep(60)
"""
# What an `exec`'d process does (it joins the namespace, it is no descendant of PID 1).
EXEC_PROBE = """
import errno, socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(5)
try:
    s.connect(sys.argv[1])
    s.sendall(b"GET / HTTP/1.0\\r\\nHost: x\\r\\n\\r\\n")
    print(s.recv(65536).decode() or "closed")
except OSError as exc:
    print(errno.errorcode.get(exc.errno, str(exc)))
"""
NO_ANSWER = ("closed", "ECONNRESET", "EPIPE")  # refused: closed at once, whatever was sent


@pytest.mark.skipif(NO_PID_NS is not None, reason=NO_PID_NS or "")
def test_only_the_host_drives_the_runtime(box: Box) -> None:
    port = free_port()
    service, net = socket_service(box, port, peers="outside")
    code = RUNTIME.format(port=port, sock=str(box.agent_socket))
    proc = box.start(box.config(code, service, net=net), pid_ns=True)
    tried = box.ws / "tried.json"
    res = json.loads(wait_for("its attempts", lambda: tried.exists() and tried.read_text()))
    assert res["own_port"] == "EACCES", res  # Landlock: bind_tcp on it, no connect_tcp
    for i in range(3):
        assert res[f"agent_socket_{i}"] in NO_ANSWER, res
    # The host (outside the namespace: SO_PEERCRED pid 0) gets the runtime's answer, through
    # PID 1's own connect grant.
    get = wait_for("an answer", lambda: _get(box) or None)
    assert get.startswith(b"HTTP/1.0 200 OK") and b"runtime " in get, get
    # A process that joins the namespace (what `podman exec` does) is refused as well.
    enter = ["nsenter", f"--target={supervisor_pid(proc)}", "--pid", "--mount", "--"]
    inside = subprocess.run(
        [*enter, "/usr/bin/python3", "-I", "-c", EXEC_PROBE, str(box.agent_socket)],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert inside.stdout.strip() in NO_ANSWER, (inside.stdout, inside.stderr)
    sock = wait_for("4 refusals", lambda: (s := box.report["agent_socket"])["refused"] >= 4 and s)
    assert sock == {"peers": "outside", "refused": 4}
    assert _get(box).startswith(b"HTTP/1.0 200 OK")  # still the host's, after all that
    rc, err = stop(proc)
    assert rc == 0 and err.count(REFUSED_LINE) == 1, err  # at most one line per 10 s
    assert "is inside the sandbox (refused so far: 1)" in err


def _get(box: Box) -> bytes:
    """One GET over the agent socket, as the host."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(box.agent_socket))
        s.sendall(b"GET / HTTP/1.0\r\nHost: runtime\r\n\r\n")
        got = b""
        while chunk := s.recv(65536):
            got += chunk
        return got


def test_peers_outside_needs_pid1_of_a_namespace(box: Box) -> None:
    """A plain process cannot tell the host from the sandbox: it refuses to start, it does not
    guess (peers is `outside` unless sandbox.json says otherwise)."""
    port = free_port()
    service = {
        "runtime": {"restart": "always", **FAST},
        "agent_socket": {"path": str(box.agent_socket), "port": port},
    }
    proc = box.start(box.config("import time; time.sleep(60)", service))
    _out, err = proc.communicate(timeout=10)
    assert proc.returncode == 2, err
    assert "agent_socket.peers 'outside' needs the supervisor to be PID 1" in err
    assert not box.agent_socket.exists()
