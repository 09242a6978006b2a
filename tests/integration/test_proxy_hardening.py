"""The egress proxy under a hostile sandbox (issue 11, items 5, 6, 8 and 9), end to end: real
rootless Podman sandboxes, the real privilege-separated proxy the control plane launches, and
requests made from inside the sandbox through its 127.0.0.1:3128 (the supervisor's forwarder).

The origin and a stand-in gateway are plain HTTP servers in this process, on loopback; the
policy allows the origin by its IP literal with `allow_private` (approvals never open private
addresses, rules may). Each probe asserts what the origin or gateway received, so a request the
proxy let through by mistake fails the test even when its status looks right.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from appliance.store.db import DB_NAME
from tests.sandbox_fixtures import ensure_base_image, sandbox_skip_reason

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MAX_PENDING = 3


class _Recorder(BaseHTTPRequestHandler):
    seen: list[dict[str, str]]  # set per server class

    def _body(self) -> str:
        if (self.headers.get("Transfer-Encoding") or "").lower() != "chunked":
            return self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
        out = b""  # a lenient decoder, as many servers have: int() takes 0x5, 0_5, +5, " 5"
        while (line := self.rfile.readline()) and (size := int(line.split(b";")[0], 16)):
            out += self.rfile.read(size)
            self.rfile.readline()
        return out.decode(errors="replace")

    def _answer(self) -> None:
        try:
            body = self._body()
        except ValueError:
            body = "<unparseable>"
        auth = self.headers.get("Authorization") or ""
        self.seen.append({"method": self.command, "path": self.path, "body": body, "auth": auth})
        out = b"seen " + self.path.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    do_GET = do_POST = _answer

    def log_message(self, *args: Any) -> None:
        pass


def _serve() -> tuple[ThreadingHTTPServer, list[dict[str, str]]]:
    seen: list[dict[str, str]] = []
    handler = type("Handler", (_Recorder,), {"seen": seen})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, seen


# Runs inside the sandbox (stdlib only): each request (base64 of raw bytes) on its own connection
# through the proxy port; prints one JSON list of [status, X-Appliance-Deny-Reason or body].
CLIENT = r"""
import base64, json, socket, sys, threading
def one(raw, timeout):
    try:
        s = socket.create_connection(("127.0.0.1", 3128), timeout=timeout)
        s.sendall(raw)
        data = b""
        while b"\r\n\r\n" not in data:
            more = s.recv(65536)
            if not more:
                break
            data += more
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1]) if lines[0] else 0
        why = [l.split(":", 1)[1].strip() for l in lines[1:]
               if l.lower().startswith("x-appliance-deny-reason:")]
        if status == 200 and raw.startswith(b"CONNECT"):
            s.sendall(b"GET /v1/../metrics HTTP/1.1\r\nHost: inference.local\r\n\r\n")
            status, why = int(s.recv(65536).split()[1]), ["tunnel"]
        return [status, why[0] if why else body.decode("latin-1")[:200]]
    except socket.timeout:
        return [0, "timeout"]
    finally:
        s.close()
raws = [base64.b64decode(r) for r in json.loads(sys.argv[1])]
timeout = float(sys.argv[2])
out = [None] * len(raws)
def run(i):
    out[i] = one(raws[i], timeout)
threads = [threading.Thread(target=run, args=(i,)) for i in range(len(raws))]
for t in threads: t.start()
for t in threads: t.join()
print(json.dumps(out))
"""


@dataclass
class Lab:
    manager: Any
    box: str
    other: str
    origin_port: int
    origin_seen: list[dict[str, str]]
    gateway_seen: list[dict[str, str]]

    def send(self, *raws: bytes, timeout: float = 10.0) -> list[tuple[int, str]]:
        arg = json.dumps([base64.b64encode(r).decode() for r in raws])
        code, out, err = self.manager.exec(
            self.box, ["python3", "-I", "-c", CLIENT, arg, str(timeout)]
        )
        assert code == 0, err.decode(errors="replace")
        return [(s, w) for s, w in json.loads(out)]

    def get(self, path: str) -> tuple[int, str]:
        p = self.origin_port
        raw = f"GET http://127.0.0.1:{p}{path} HTTP/1.1\r\nHost: 127.0.0.1:{p}\r\n\r\n"
        return self.send(raw.encode("latin-1"))[0]

    @property
    def audit(self) -> list[dict[str, Any]]:
        log = self.manager.settings.state_dir / "audit" / "audit.jsonl"
        return [json.loads(line) for line in log.read_text().splitlines() if line]


def _policy(port: int) -> Any:
    from sandbox.lifecycle.manager import read_policy_file
    from tests.security.test_escape_battery import POLICIES

    base = read_policy_file(POLICIES / "default.yaml")
    network = base.network.model_validate(
        {
            "allow": [{"host": "127.0.0.1", "ports": [port], "paths": ["/ok/**"],
                       "allow_private": True}],
            "deny": [{"host": "127.0.0.1", "ports": [port], "paths": ["/ok/secret/**"]}],
            "approval": {"mode": "hold", "hold_seconds": 60},
        }
    )  # fmt: skip
    return base.with_network(network)


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    if (why := sandbox_skip_reason()) is not None:
        pytest.skip(why)
    from appliance.config import load_config
    from appliance.control.wiring import sandbox_manager
    from appliance.store import open_store

    ensure_base_image()
    origin, origin_seen = _serve()
    gateway, gateway_seen = _serve()
    state = Path(tempfile.mkdtemp(prefix="ph-"))  # short: unix socket paths live under it
    config = load_config(
        {
            "state_dir": str(state),
            "gateway": {"host": "127.0.0.1", "port": gateway.server_address[1]},
            "sandbox": {"max_pending_approvals": MAX_PENDING},
        }
    )
    box, other = f"ph-{os.getpid()}", f"ph-other-{os.getpid()}"
    try:
        with open_store(config.state_dir) as store:
            manager = sandbox_manager(config, store)
            try:
                manager.create(box, _policy(origin.server_address[1]), None)
                manager.create(other, _policy(origin.server_address[1]), None)
                yield Lab(manager, box, other, origin.server_address[1], origin_seen, gateway_seen)
            finally:
                for record in manager.boxes.list():
                    with contextlib.suppress(Exception):
                        manager.remove(record.name)
    finally:
        origin.shutdown()
        gateway.shutdown()
        shutil.rmtree(state, ignore_errors=True)


# --- item 5: paths and framing ------------------------------------------------------------------

TRICKS = [
    ("/ok/../admin", 403),
    ("/ok/%2e%2e/admin", 403),
    ("/ok//secret/x", 403),
    ("/ok/./secret/x", 403),
    ("/ok/%73ecret/x", 403),
    ("/ok/SECRET/x", 403),
    ("/ok/%2fsecret/x", 400),
    ("/ok/%5csecret/x", 400),
    ("/ok/\\secret/x", 400),
    ("/ok/%00x", 400),
    ("/ok/\xe9", 400),
    ("/ok/x/..;/secret/y", 400),
]


def test_path_tricks_through_a_real_sandbox(lab: Lab) -> None:
    p = lab.origin_port
    raws = [
        f"GET http://127.0.0.1:{p}{path} HTTP/1.1\r\nHost: 127.0.0.1:{p}\r\n\r\n".encode("latin-1")
        for path, _ in TRICKS
    ]
    before = len(lab.origin_seen)
    got = lab.send(*raws)
    assert [s for s, _ in got] == [want for _, want in TRICKS], list(zip(TRICKS, got, strict=True))
    assert lab.origin_seen[before:] == []  # none of them reached the origin


def test_the_origin_gets_the_normalised_target(lab: Lab) -> None:
    before = len(lab.origin_seen)
    assert lab.get("/ok/a/../b//%63?q=%2f")[0] == 200
    assert [s["path"] for s in lab.origin_seen[before:]] == ["/ok/b/c?q=%2f"]


def test_chunk_size_and_framing_tricks_are_refused(lab: Lab) -> None:
    p = lab.origin_port
    head = f"POST http://127.0.0.1:{p}/ok/x HTTP/1.1\r\nHost: 127.0.0.1:{p}\r\n"
    raws = [
        (head + "Transfer-Encoding: chunked\r\n\r\n" + size + "\r\nhello\r\n0\r\n\r\n").encode()
        for size in ("0x5", "0_5", "+5", " 5")
    ]
    raws.append((head + "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello"
                 "\r\n0\r\n\r\n").encode())  # fmt: skip
    raws.append((head + "Content-Length: 5\r\nContent-Length: 5\r\n\r\nhello").encode())
    before = len(lab.origin_seen)
    assert [s for s, _ in lab.send(*raws)] == [400] * len(raws)
    assert "hello" not in [s["body"] for s in lab.origin_seen[before:]]  # no body got through
    ok = (head + "Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n").encode()
    assert lab.send(ok)[0][0] == 200 and lab.origin_seen[-1]["body"] == "hello"


# --- item 6: inference.local carries /v1/ only -------------------------------------------------


def test_inference_local_refuses_metrics_from_inside(lab: Lab) -> None:
    raws = [
        f"GET http://inference.local{path} HTTP/1.1\r\nHost: inference.local\r\n\r\n".encode()
        for path in ("/metrics", "/v1/../metrics", "/health", "/docs", "/openapi.json")
    ]
    raws.append(b"CONNECT inference.local:80 HTTP/1.1\r\n\r\n")  # then /v1/../metrics inside
    got = lab.send(*raws)
    assert [s for s, _ in got] == [403] * len(raws), got
    assert "only /v1/" in got[0][1]
    assert lab.gateway_seen == []
    raw = b"GET http://inference.local/v1/models HTTP/1.1\r\nHost: inference.local\r\n\r\n"
    status, _ = lab.send(raw)[0]
    key = (lab.manager.paths(lab.box).key).read_text().strip()
    assert status == 200 and lab.gateway_seen[-1]["path"] == "/v1/models"
    assert lab.gateway_seen[-1]["auth"] == f"Bearer {key}"  # the proxy still injects the key


# --- item 8: approval flood ----------------------------------------------------------------------


def test_pending_approvals_are_capped(lab: Lab) -> None:
    from sandbox.proxy import AdminClient

    n = MAX_PENDING + 4
    raws = [f"CONNECT h{i}.flood.test:443 HTTP/1.1\r\n\r\n".encode() for i in range(n)]
    start = time.monotonic()
    got = lab.send(*raws, timeout=6)
    refused = [w for s, w in got if s == 403]
    assert len(refused) == n - MAX_PENDING, got
    assert all("pending approvals" in w for w in refused)
    assert sum(1 for s, w in got if (s, w) == (0, "timeout")) == MAX_PENDING  # the held ones
    assert time.monotonic() - start < 40
    admin = AdminClient(lab.manager.paths(lab.box).admin_socket)
    try:
        pending = admin.list()
        assert len(pending) == MAX_PENDING
        for p in pending:
            admin.deny(p["id"])
    finally:
        admin.close()
    flood = [
        r for r in lab.audit
        if r["event"] == "egress.deny" and "pending approvals" in r.get("reason", "")
    ]  # fmt: skip
    assert len(flood) == n - MAX_PENDING and {r["sandbox"] for r in flood} == {lab.box}


# --- item 9: the proxy's privileges --------------------------------------------------------------


def _proxy_process(lab: Lab) -> int:
    """The process that parses the sandbox's HTTP: the monitor's one child (the pid the control
    plane keeps is the monitor's), or that pid itself when it has none (the old, unseparated
    proxy: then the checks below fail on its uid, as they should)."""
    monitor = int(lab.manager.paths(lab.box).proxy_pid.read_text())
    children = Path(f"/proc/{monitor}/task/{monitor}/children").read_text().split()
    assert len(children) <= 1, children
    return int(children[0]) if children else monitor


def _status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


PROBE = r"""
import errno, json, socket, sys
out = {}
for name, path in json.loads(sys.argv[1]).items():
    try:
        if name == "podman" or name.startswith("other_egress"):
            s = socket.socket(socket.AF_UNIX); s.connect(path); s.close()
        else:
            open(path, "rb").close()
        out[name] = "ok"
    except OSError as exc:
        out[name] = errno.errorcode.get(exc.errno, str(exc.errno))
print(json.dumps(out))
"""


def test_the_proxy_runs_unprivileged_and_cannot_read_secrets(lab: Lab) -> None:
    pid = _proxy_process(lab)
    st = _status(pid)
    uids = [int(u) for u in st["Uid"].split()]
    gids = [int(g) for g in st["Gid"].split()]
    assert 0 not in uids and 0 not in gids, st["Uid"]
    assert st["Groups"] == ""
    for caps in ("CapEff", "CapPrm", "CapInh", "CapAmb"):
        assert int(st[caps], 16) == 0, (caps, st[caps])
    assert st["NoNewPrivs"] == "1"
    assert lab.manager.podman.account.pw_uid not in uids  # not the Podman socket's owner

    config = lab.manager.settings
    boxes_fd = os.open(lab.manager.paths(lab.other).root.parent, os.O_PATH | os.O_DIRECTORY)
    targets = {
        "store": str(config.state_dir / DB_NAME),
        "other_key": str(lab.manager.paths(lab.other).key),
        "own_key": str(lab.manager.paths(lab.box).key),
        "audit": str(config.state_dir / "audit" / "audit.jsonl"),
        "podman": str(lab.manager.podman.socket),
        # another sandbox's egress socket: its key injected, its budget spent, its approvals
        "other_egress": str(lab.manager.paths(lab.other).egress / "egress.sock"),
        # the same socket reached beneath the service home (through a directory descriptor
        # root opened): the egress directory itself must refuse, whatever the home's mode
        "other_egress_beneath_home": f"/proc/self/fd/{boxes_fd}/{lab.other}/egress/egress.sock",
    }
    # As root every one of them opens: the refusals below are the proxy's identity, not ENOENT.
    as_root = subprocess.run(
        [sys.executable, "-I", "-c", PROBE, json.dumps(targets)],
        capture_output=True, text=True, check=True, timeout=30, pass_fds=(boxes_fd,),
    )  # fmt: skip
    assert set(json.loads(as_root.stdout).values()) == {"ok"}, as_root.stdout
    # The same attempt with the proxy's exact credentials (uid, gid, no groups, no caps).
    as_proxy = subprocess.run(
        [sys.executable, "-I", "-c", PROBE, json.dumps(targets)],
        capture_output=True, text=True, check=True, timeout=30, cwd="/",
        user=uids[0], group=gids[0], extra_groups=[], pass_fds=(boxes_fd,),
    )  # fmt: skip
    os.close(boxes_fd)
    got = json.loads(as_proxy.stdout)
    assert got == {name: errno.errorcode[errno.EACCES] for name in targets}, got


def test_the_proxy_is_not_dumpable_before_the_monitor_sends_the_key() -> None:
    """The key arrives in the monitor's hello: the proxy must be non-dumpable before it reads
    it, or a process of the same uid (another sandbox's proxy) could read it from /proc/PID/mem
    meanwhile. The monitor here never says hello: the proxy waits with no key, and must already
    be non-dumpable (its /proc/PID entries then belong to root, not to the proxy's uid)."""
    import pwd
    import socket

    if os.geteuid() != 0:
        pytest.skip("runs the proxy as another user: needs root")
    nobody = pwd.getpwnam("nobody")
    egress, admin = socket.socket(socket.AF_UNIX), socket.socket(socket.AF_UNIX)
    monitor, child = socket.socketpair()
    fds = (egress.fileno(), admin.fileno(), child.fileno())
    argv = [
        sys.executable, "-m", "sandbox.proxy", "--sandbox", "nd", "--socket", "/nonexistent/e",
        "--admin-socket", "/nonexistent/a", "--socket-fd", str(fds[0]),
        "--admin-fd", str(fds[1]), "--privsep-fd", str(fds[2]),
    ]  # fmt: skip
    proc = subprocess.Popen(
        argv, cwd="/", pass_fds=fds, user=nobody.pw_uid, group=nobody.pw_gid, extra_groups=[],
        env={"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(Path(__file__).parents[2])},
    )  # fmt: skip
    try:
        owner = None
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and proc.poll() is None:
            owner = os.stat(f"/proc/{proc.pid}/status").st_uid
            if owner == 0:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the proxy exited before the monitor's hello"
        assert owner == 0, f"/proc/{proc.pid} still belongs to uid {owner}: dumpable"
        assert _status(proc.pid)["Uid"].split()[0] == str(nobody.pw_uid)  # it did drop
    finally:
        proc.kill()
        proc.wait()
        for s in (egress, admin, monitor, child):
            s.close()


def test_the_proxy_dies_with_its_monitor_and_the_sandbox_gets_a_new_one(lab: Lab) -> None:
    """The monitor killed outright: its unprivileged child must not linger holding the key."""
    import signal

    paths = lab.manager.paths(lab.other)
    monitor = int(paths.proxy_pid.read_text())
    child = int(Path(f"/proc/{monitor}/task/{monitor}/children").read_text().split()[0])
    os.kill(monitor, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and Path(f"/proc/{child}").exists():
        if _status(child).get("State", "").startswith("Z"):
            break
        time.sleep(0.1)
    assert not Path(f"/proc/{child}").exists() or _status(child)["State"].startswith("Z")
    out = lab.manager.reconcile()
    assert lab.other in out.proxies_restarted
