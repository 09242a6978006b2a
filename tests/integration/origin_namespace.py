"""An origin server with a *public* address, in a network and mount namespace of its own, for
tests where an operator's approval must really let a sandbox's request through.

Why: an approval never opens a private address (`EgressProxy._hold` returns
`approved_may_be_private`, which the standalone proxy leaves False), and IP literals are never
held at all (`_decide` only holds names). So an approved request to a test server on 127.0.0.1,
or on this host's own interface address, is still refused as "resolves to a private or reserved
address" — exactly as in production, where approvals are for public hosts. To exercise the real
path (a *name* that resolves to a *global* address) without touching the machine's network, the
origin server runs in its own namespaces with a global address on its loopback and an
/etc/hosts naming the test hosts; the control plane (which starts the proxies) runs in those
namespaces too (`Origin.in_namespace` as running_control_plane's prefix), so each proxy resolves
and connects there, as on a host with a public route.

`forwarded_port` reaches a TCP port of that namespace (the control plane's, for a browser) from
the test's own network namespace; `webhook_receiver` is a notification receiver there (the control
plane delivers to 127.0.0.1 of its own namespace), and `received` what it got.

JOB_AGENT, a sandbox's command (stdlib only): it polls job files that the test drops into its
persistent home (`drop_job`) and makes each request through the in-sandbox proxy port
(127.0.0.1:3128), writing the outcome back as `<id>.result` (`job_result`).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.helpers import free_port
from tests.sandbox_fixtures import sandbox_skip_reason

NAMESPACE_TOOLS = ("unshare", "nsenter", "ip", "mount")


def skip_reason() -> str | None:
    """Why an origin namespace with a real sandbox cannot run here, or None."""
    if (why := sandbox_skip_reason()) is not None:
        return why
    missing = [tool for tool in NAMESPACE_TOOLS if shutil.which(tool) is None]
    return f"{', '.join(missing)} not installed" if missing else None


# Deprecated 6to4 relay anycast (RFC 7526): globally routable by `ipaddress`, used by nobody, and
# only ever assigned inside the test's own network namespace.
PUBLIC_IP = "192.88.99.1"
PRIVATE_HOST = "private.origin.test"  # resolves to 127.0.0.1 in the namespace

ORIGIN = r"""
import http.server, sys
class Handler(http.server.BaseHTTPRequestHandler):
    def _answer(self):
        n = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(n)
        body = f"origin {self.headers.get('Host')} {self.command} {self.path}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    do_GET = do_POST = _answer
    def log_message(self, *args):
        pass
server = http.server.ThreadingHTTPServer(("0.0.0.0", 80), Handler)
print("ready", flush=True)
server.serve_forever()
"""

# The sandbox's agent: stdlib only. Jobs are `<id>.job` JSON files in its home; results
# `<id>.result`.
JOB_AGENT = r"""
import http.client, json, os, threading, time
HOME = "/home/agent"
def fetch(job, spec):
    start = time.monotonic()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", 3128, timeout=300)
        body = spec.get("body")
        conn.request(spec.get("method", "GET"), spec["url"],
                     body=body.encode() if body is not None else None)
        resp = conn.getresponse()
        out = {"status": resp.status, "body": resp.read().decode(errors="replace")}
    except Exception as exc:
        out = {"error": repr(exc)}
    out["seconds"] = time.monotonic() - start
    tmp = f"{HOME}/{job}.partial"
    with open(tmp, "w") as fh:
        json.dump(out, fh)
    os.rename(tmp, f"{HOME}/{job}.result")
    print("RESULT", job, json.dumps(out), flush=True)
seen = set()
print("AGENT READY", os.getpid(), flush=True)
while True:
    for name in sorted(os.listdir(HOME)):
        if name.endswith(".job") and name not in seen:
            seen.add(name)
            with open(f"{HOME}/{name}") as fh:
                spec = json.load(fh)
            threading.Thread(target=fetch, args=(name[:-4], spec), daemon=True).start()
    time.sleep(0.1)
"""

# Run behind nsenter (the namespace's network) with an inherited listening socket of the test's own
# network namespace (fd argv[1]): each connection accepted there is spliced to 127.0.0.1:argv[2].
_FORWARDER = r"""
import socket, sys, threading
listener = socket.socket(fileno=int(sys.argv[1]))
port = int(sys.argv[2])
def pump(src, dst):
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
def serve(client):
    try:
        upstream = socket.create_connection(("127.0.0.1", port), timeout=10)
    except OSError:
        client.close()
        return
    upstream.settimeout(None)
    threading.Thread(target=pump, args=(upstream, client), daemon=True).start()
    pump(client, upstream)
print("forwarding", flush=True)
while True:
    conn, _ = listener.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""


# The webhook receiver, run in the origin's namespace: each POST saved as <n>.json (headers and
# the raw body) in argv[2], answered 200; argv[1]: its port on 127.0.0.1.
RECEIVER = r"""
import base64, http.server, itertools, json, os, sys
OUT = sys.argv[2]
count = itertools.count()
class Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        n = next(count)
        record = {"path": self.path, "headers": dict(self.headers),
                  "body": base64.b64encode(body).decode()}
        with open(f"{OUT}/.{n}.tmp", "w") as fh:
            json.dump(record, fh)
        os.rename(f"{OUT}/.{n}.tmp", f"{OUT}/{n:04d}.json")
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()
    def log_message(self, *args):
        pass
server = http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler)
print("ready", flush=True)
server.serve_forever()
"""


@dataclass
class Origin:
    """The origin server's process; its pid names the namespaces."""

    proc: subprocess.Popen[str]

    @property
    def in_namespace(self) -> list[str]:
        """A command prefix that runs a command in the origin's network and mount namespace."""
        return ["nsenter", "--target", str(self.proc.pid), "--net", "--mount", "--"]


@contextlib.contextmanager
def origin_namespace(scratch: Path, public_hosts: tuple[str, ...]) -> Iterator[Origin]:
    """The origin server on port 80 of PUBLIC_IP, answering `<name>.origin.test` for each of
    `public_hosts` (and PRIVATE_HOST on 127.0.0.1), until the block ends."""
    hosts = scratch / "hosts"
    public = " ".join(f"{h}.origin.test" for h in public_hosts)
    hosts.write_text(f"127.0.0.1 localhost {PRIVATE_HOST}\n{PUBLIC_IP} {public}\n")
    setup = (
        f"set -e; ip link set lo up; ip addr add {PUBLIC_IP}/32 dev lo; "
        f"mount --bind {hosts} /etc/hosts; "
        f'exec {sys.executable} -I -c "$ORIGIN"'
    )
    proc = subprocess.Popen(
        ["unshare", "--net", "--mount", "--propagation", "private", "--", "sh", "-c", setup],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "ORIGIN": ORIGIN},
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "ready":
        proc.kill()
        raise AssertionError(f"origin namespace did not start: {line!r} {proc.stderr.read()}")
    try:
        yield Origin(proc)
    finally:
        proc.terminate()
        try:
            proc.communicate(timeout=10)  # also closes its pipes
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


@contextlib.contextmanager
def forwarded_port(origin: Origin, port: int) -> Iterator[int]:
    """A port on this namespace's 127.0.0.1 whose connections reach 127.0.0.1:`port` in the
    origin's namespace (a browser here, the control plane there)."""
    listener = socket.create_server(("127.0.0.1", 0))
    argv = [sys.executable, "-I", "-c", _FORWARDER, str(listener.fileno()), str(port)]
    proc = subprocess.Popen(
        [*origin.in_namespace, *argv],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        text=True,
        pass_fds=(listener.fileno(),),  # nsenter passes it on to the forwarder
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "forwarding"
        yield listener.getsockname()[1]
    finally:
        listener.close()
        proc.kill()
        proc.communicate()


@contextlib.contextmanager
def webhook_receiver(origin: Origin, inbox: Path) -> Iterator[int]:
    """RECEIVER on a port of the origin's 127.0.0.1 (returned), saving into `inbox`."""
    port = free_port()  # free here; the namespace has nothing listening at all
    proc = subprocess.Popen(
        [*origin.in_namespace, sys.executable, "-I", "-c", RECEIVER, str(port), str(inbox)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        yield port
    finally:
        proc.kill()
        proc.communicate()


def received(inbox: Path) -> list[dict[str, Any]]:
    """What webhook_receiver got so far, in order: {"headers", "raw" (bytes), "body" (JSON)}."""
    out = []
    for path in sorted(inbox.glob("*.json")):
        got = json.loads(path.read_text())
        raw = base64.b64decode(got["body"])
        out.append({"headers": got["headers"], "raw": raw, "body": json.loads(raw)})
    return out


def drop_job(home: Path, url: str, method: str = "GET", body: str | None = None) -> str:
    """Hand JOB_AGENT (whose home is `home`) one request; returns the job id."""
    job = uuid.uuid4().hex[:10]
    tmp = home / f".{job}.tmp"  # not a .job name until complete
    tmp.write_text(json.dumps({"url": url, "method": method, "body": body}))
    tmp.chmod(0o644)
    tmp.rename(home / f"{job}.job")
    return job


def job_result(home: Path, job: str, timeout: float) -> dict[str, Any] | None:
    """JOB_AGENT's outcome of `job`, or None when none came within `timeout` s."""
    path = home / f"{job}.result"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file():
            return json.loads(path.read_text())
        time.sleep(0.1)
    return None
