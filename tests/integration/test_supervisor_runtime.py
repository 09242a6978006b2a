"""The supervisor keeping an always-on runtime up, run for real on this host
(tests/integration/supervisor_box.py): restarts with backoff, stops on SIGTERM, fails closed
when the control plane's check-in goes stale, the agent socket, the runtime's secret env."""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from itertools import pairwise
from pathlib import Path
from textwrap import dedent
from typing import Any, TypeVar

import pytest

from tests.helpers import free_port
from tests.integration.supervisor_box import AGENT_UID, AS_ROOT, UNUSABLE, Box, made_box

pytestmark = pytest.mark.integration

if UNUSABLE:
    pytest.skip(UNUSABLE, allow_module_level=True)

T = TypeVar("T")
FAST = {"backoff_initial_s": 0.2, "backoff_max_s": 0.4, "healthy_after_s": 30}
# The runtime writes its pid to ws/pids, one line per start, then sleeps.
SLEEPER = """
    import os, time
    with open(os.path.join(os.environ["WS"], "pids"), "a") as f: f.write(f"{os.getpid()}\\n")
    time.sleep(60)
"""


@pytest.fixture
def box() -> Iterator[Box]:
    with made_box() as made:
        yield made


@pytest.fixture
def started(box: Box) -> Iterator[Callable[[Path], subprocess.Popen[str]]]:
    """Start the supervisor on a config; killed (with its runtime) at the end of the test."""
    procs: list[subprocess.Popen[str]] = []

    def start(cfg: Path) -> subprocess.Popen[str]:
        procs.append(box.popen(cfg))
        return procs[-1]

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.communicate(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()


def wait_for(what: str, check: Callable[[], T | None], timeout: float = 5.0) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (got := check()) is not None and got is not False:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def runtime_state(box: Box) -> dict[str, Any] | None:
    try:
        return box.report.get("runtime")
    except (OSError, ValueError):  # not written yet
        return None


def in_state(box: Box, state: str, timeout: float = 5.0) -> dict[str, Any]:
    """The report's runtime section, once it shows `state`."""
    return wait_for(state, lambda: (r := runtime_state(box)) and r["state"] == state and r, timeout)


def pids(box: Box) -> list[int]:
    path = box.ws / "pids"
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def started_pid(box: Box, n: int, timeout: float = 5.0) -> int:
    """The pid of the runtime's n-th start (1-based), once it has started and said so."""
    return wait_for(
        f"start {n}", lambda: pids(box)[n - 1] if len(pids(box)) >= n else None, timeout
    )


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def check_in(box: Box) -> float:
    """What the control plane does: rewrite the check-in file (root-owned, like the host's)."""
    tmp = box.config_dir / "checkin.tmp"
    tmp.write_text(f"{time.time()}\n")
    tmp.chmod(0o644)
    os.replace(tmp, box.checkin)
    return time.monotonic()


def stop(proc: subprocess.Popen[str]) -> tuple[int, str]:
    proc.send_signal(signal.SIGTERM)
    _out, err = proc.communicate(timeout=10)
    return proc.returncode, err


# -- restarts ------------------------------------------------------------------------------------


def test_a_crashed_runtime_is_restarted_and_the_report_says_why(box: Box, started: Any) -> None:
    proc = started(box.config(SLEEPER, {"runtime": {"restart": "always", **FAST}}))
    first = started_pid(box, 1)
    time.sleep(0.3)
    os.kill(first, signal.SIGKILL)
    second = started_pid(box, 2)
    assert second != first and proc.poll() is None  # PID 1 stays
    rt = wait_for("running again", lambda: (r := runtime_state(box)) and r["pid"] == second and r)
    assert rt["state"] == "running" and rt["starts"] == 2 and rt["restarts"] == 1
    last = rt["last_exit"]
    assert last["signal"] == signal.SIGKILL and last["code"] is None
    assert last["reason"] == "killed by signal 9 (SIGKILL)" and last["uptime_s"] >= 0.3
    assert rt["fail_closed_after"] == 0 and rt["next_start_at"] is None
    code, err = stop(proc)
    assert code == 0 and not alive(second)
    assert "runtime killed by signal 9 (SIGKILL) after" in err and "restart in 0.2 s" in err


def test_backoff_doubles_to_its_maximum_and_resets_after_a_healthy_run(
    box: Box, started: Any
) -> None:
    # Every start exits 1 at once, except the 4th, which runs 1.2 s (healthy_after_s is 1).
    code = """
        import os, sys, time
        path = os.path.join(os.environ["WS"], "starts")
        with open(path, "a") as f: f.write(f"{time.monotonic()}\\n")
        if len(open(path).read().split()) == 4: time.sleep(1.2)
        sys.exit(1)
    """
    runtime = {"backoff_initial_s": 0.3, "backoff_max_s": 0.6, "healthy_after_s": 1.0}
    proc = started(box.config(code, {"runtime": runtime}))
    starts = box.ws / "starts"
    wait_for("6 starts", lambda: starts.exists() and len(starts.read_text().split()) >= 6, 15)
    rt = runtime_state(box)
    assert rt is not None and rt["restarts"] >= 5 and rt["last_exit"]["code"] == 1
    assert rt["last_exit"]["reason"] == "exited with code 1"
    code_, err = stop(proc)
    assert code_ == 0
    delays = [float(d) for d in re.findall(r"restart in ([0-9.]+) s", err)]
    assert delays[:5] == [0.3, 0.6, 0.6, 0.3, 0.6], err
    at = [float(t) for t in starts.read_text().split()]
    gaps = [b - a for a, b in pairwise(at)][:5]
    minimum = [0.3, 0.6, 0.6, 1.2 + 0.3, 0.6]  # the 4th start ran 1.2 s before its restart
    assert all(gap >= least - 0.02 for gap, least in zip(gaps, minimum, strict=True)), gaps


def test_a_runtime_in_backoff_shows_when_it_starts_next(box: Box, started: Any) -> None:
    runtime = {"backoff_initial_s": 5, "backoff_max_s": 5, "healthy_after_s": 30}
    started(box.config("import sys; sys.exit(4)", {"runtime": runtime}))
    rt = in_state(box, "backoff")
    assert rt["pid"] is None and rt["next_start_at"] is not None
    assert rt["reason"].startswith("runtime exited with code 4 after") and rt["restarts"] == 0
    assert rt["reason"].endswith("restart in 5 s")


@pytest.mark.parametrize("ignores_sigterm", [False, True])
def test_sigterm_stops_the_runtime_and_pid1_exits(
    box: Box, started: Any, ignores_sigterm: bool
) -> None:
    code = SLEEPER
    if ignores_sigterm:
        code = "import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN)\n" + dedent(code)
    proc = started(box.config(code, {"runtime": {"restart": "always", **FAST}}))
    pid = started_pid(box, 1)
    t0 = time.monotonic()
    rc, err = stop(proc)
    assert rc == 0 and time.monotonic() - t0 < 3 and not alive(pid)
    rt = runtime_state(box)
    assert rt is not None and rt["state"] == "stopped" and rt["pid"] is None
    assert rt["reason"] == "supervisor stopping on SIGTERM"
    sig = signal.SIGKILL if ignores_sigterm else signal.SIGTERM
    assert rt["last_exit"]["signal"] == sig and rt["restarts"] == 0
    assert rt["last_exit"]["reason"].startswith("stopped (supervisor stopping on SIGTERM)")
    assert ("SIGKILL to its process group" in err) == ignores_sigterm


def test_restart_never_exits_with_the_runtime_code(box: Box, started: Any) -> None:
    proc = started(box.config("import sys; sys.exit(5)", {"runtime": {"restart": "never"}}))
    assert proc.wait(timeout=10) == 5
    rt = runtime_state(box)
    assert rt is not None and rt["state"] == "stopped" and rt["last_exit"]["code"] == 5


def test_orphans_of_a_crashed_runtime_are_stopped_before_the_restart(
    box: Box, started: Any
) -> None:
    # Each start leaves a child in its own session (outside the runtime's process group).
    code = """
        import os, time
        child = os.fork()
        if child == 0:
            os.setsid(); time.sleep(60); os._exit(0)
        with open(os.path.join(os.environ["WS"], "pids"), "a") as f: f.write(f"{child}\\n")
        time.sleep(0.3)
    """
    started(box.config(code, {"runtime": {"restart": "always", **FAST}}))
    orphan = started_pid(box, 1)
    started_pid(box, 2)
    assert not alive(orphan)


# -- fail closed ---------------------------------------------------------------------------------


def test_a_stale_checkin_stops_the_runtime_and_a_fresh_one_restarts_it(
    box: Box, started: Any
) -> None:
    after = 2
    service = {"runtime": {"restart": "always", **FAST}}
    service["checkin"] = {"path": str(box.checkin), "after_s": after}
    check_in(box)
    done = threading.Event()
    last = [check_in(box)]

    def keep_checking_in() -> None:
        while not done.wait(0.3):
            last[0] = check_in(box)

    ticker = threading.Thread(target=keep_checking_in, daemon=True)
    ticker.start()
    proc = started(box.config(SLEEPER, service))
    pid = started_pid(box, 1)
    time.sleep(after + 1.0)  # fresh check-ins: the runtime stays up past after_s
    assert alive(pid) and runtime_state(box)["state"] == "running"  # type: ignore[index]
    done.set()
    ticker.join()
    silent = last[0]
    wait_for("the runtime stopped", lambda: not alive(pid), after + 4)
    gone = time.monotonic() - silent
    assert after <= gone <= after + 2, gone
    rt = runtime_state(box)
    assert rt is not None and rt["state"] == "fail_closed" and rt["fail_closed_at"]
    assert (
        rt["reason"].startswith("control plane silent for ")
        and "fail_closed_after=2" in rt["reason"]
    )
    assert rt["last_exit"]["reason"] == "stopped (fail closed): killed by signal 15 (SIGTERM)"
    assert proc.poll() is None
    back = check_in(box)
    second = started_pid(box, 2, timeout=3)
    assert time.monotonic() - back <= 2.5
    rt = wait_for("running", lambda: (r := runtime_state(box)) and r["pid"] == second and r)
    assert rt["state"] == "running" and rt["starts"] == 2 and rt["restarts"] == 0
    _rc, err = stop(proc)
    assert "control plane silent for" in err and "runtime stopped" in err
    assert "control plane checked in" in err


def test_without_a_checkin_the_runtime_waits_then_starts_on_the_first(
    box: Box, started: Any
) -> None:
    service = {
        "runtime": {"restart": "always", **FAST},
        "checkin": {"path": str(box.checkin), "after_s": 5},
    }
    started(box.config(SLEEPER, service))
    rt = in_state(box, "waiting")
    assert rt["pid"] is None and rt["starts"] == 0 and rt["fail_closed_after"] == 5
    rep = box.report  # enforcement was checked (a child restricted, never exec'd)
    assert rep["landlock"]["enforced"] is True and rep["agent_started"] is False
    time.sleep(1.5)
    assert pids(box) == []
    t0 = check_in(box)
    started_pid(box, 1, timeout=3)
    assert time.monotonic() - t0 <= 2.5
    assert box.report["agent_started"] is True


def test_an_old_checkin_file_counts_as_silence(box: Box, started: Any) -> None:
    check_in(box)
    old = time.time() - 600
    os.utime(box.checkin, (old, old))
    service = {
        "runtime": {"restart": "always"},
        "checkin": {"path": str(box.checkin), "after_s": 5},
    }
    started(box.config(SLEEPER, service))
    in_state(box, "waiting")
    time.sleep(1.2)
    assert pids(box) == []


def test_after_s_zero_turns_fail_closed_off(box: Box, started: Any) -> None:
    service = {
        "runtime": {"restart": "always"},
        "checkin": {"path": str(box.checkin), "after_s": 0},
    }
    started(box.config(SLEEPER, service))  # no check-in file at all
    started_pid(box, 1)
    rt = in_state(box, "running")
    assert rt["fail_closed_after"] == 0


# -- the agent socket ----------------------------------------------------------------------------


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


def socket_service(box: Box, port: int, **extra: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    service = {
        "runtime": {"restart": "always", **FAST},
        "agent_socket": {"path": str(box.agent_socket), "port": port},
        **extra,
    }
    net = {"connect_tcp": [box.port, port], "bind_tcp": [port]}  # what policy `listen` compiles to
    return service, net


def test_the_agent_socket_forwards_http_to_the_runtime(box: Box, started: Any) -> None:
    port = free_port()
    service, net = socket_service(box, port)
    started(box.config(http_server(port), service, net=net))
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


def test_the_agent_socket_closes_cleanly_while_the_runtime_is_down(box: Box, started: Any) -> None:
    port = free_port()
    service, net = socket_service(box, port, checkin={"path": str(box.checkin), "after_s": 5})
    proc = started(box.config(http_server(port), service, net=net))  # no check-in: waiting
    in_state(box, "waiting")
    for _ in range(3):
        assert post(box.agent_socket, "/", b"hello") == b""  # EOF, no ECONNRESET
    _rc, err = stop(proc)
    assert err.count(f"agent socket: cannot reach the runtime on 127.0.0.1:{port}") == 1


def test_a_stale_agent_socket_is_replaced_and_anything_else_refused(box: Box, started: Any) -> None:
    port = free_port()
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(box.agent_socket))  # left by an earlier run: nobody listens on it
    stale.close()
    service, net = socket_service(box, port)
    first = started(box.config(http_server(port), service, net=net))
    started_pid(box, 1)
    assert wait_for("an answer", lambda: post(box.agent_socket, "/", b"x") or None)
    assert stop(first)[0] == 0
    box.agent_socket.unlink()
    box.agent_socket.write_text("not a socket")
    proc = box.popen(box.config(http_server(port), service, net=net))
    _out, err = proc.communicate(timeout=10)
    assert proc.returncode == 2 and "cannot bind the agent socket" in err


# -- the runtime's environment and what it cannot touch ------------------------------------------


def test_the_runtime_env_file_reaches_the_runtime_only(box: Box, started: Any) -> None:
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
    proc = started(cfg)
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
def test_a_bad_runtime_env_file_exits_2_without_quoting_it(
    box: Box, started: Any, content: str
) -> None:
    box.runtime_env.write_text(content)
    service = {"runtime": {"restart": "always"}, "runtime_env_file": str(box.runtime_env)}
    proc = started(box.config(SLEEPER, service))
    _out, err = proc.communicate(timeout=10)
    assert proc.returncode == 2 and str(box.runtime_env) in err and "secret-value" not in err


@pytest.mark.parametrize(
    "service",
    [
        {"runtime": {"restart": "sometimes"}},
        {"runtime": {"backoff_initial_s": 0}},
        {"runtime": {"backoff_initial_s": 5, "backoff_max_s": 1}},
        {"runtime": {"restart": "always", "typo_s": 1}},
        {"agent_socket": {"path": "relative.sock", "port": 18789}},
        {"agent_socket": {"path": "/run/x.sock", "port": 0}},
        {"agent_socket": {"path": "/run/x.sock", "port": True}},
        {"checkin": {"path": "/run/checkin", "after_s": -1}},
        {"checkin": {"path": "/run/checkin"}},
        {"runtime_env_file": "env.json"},
    ],
)
def test_bad_always_on_keys_exit_2(box: Box, started: Any, service: dict[str, Any]) -> None:
    proc = started(box.config(SLEEPER, service))
    _out, err = proc.communicate(timeout=10)
    assert proc.returncode == 2 and next(iter(service)) in err
    assert pids(box) == []


def test_hard_requirement_unmet_is_a_failed_runtime(box: Box, started: Any) -> None:
    proc = started(box.config(SLEEPER, {"runtime": {"restart": "always"}}, min_abi=99))
    assert proc.wait(timeout=10) == 3
    rt = runtime_state(box)
    assert rt is not None and rt["state"] == "failed" and "99" in rt["reason"]
    assert box.report["agent_started"] is False and pids(box) == []


def test_the_runtime_cannot_touch_the_checkin_or_the_agent_socket(box: Box, started: Any) -> None:
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
    started(box.config(code, service, net=net))
    tried = box.ws / "tried.json"
    res = json.loads(wait_for("the attempts", lambda: tried.exists() and tried.read_text()))
    # The socket's directory is the agent uid's: only Landlock stands in the way there.
    assert res["sock_unlink"] == res["sock_rename"] == res["sock_bind"] == "PermissionError"
    assert box.agent_socket.exists()
    if AS_ROOT:  # the check-in file is root's, as on the host (and its mount is read-only)
        assert res["checkin_write"] == res["checkin_touch"] == "PermissionError"
        assert res["checkin_unlink"] == "PermissionError"


def test_restarts_while_the_forwarders_log_from_other_threads(box: Box, started: Any) -> None:
    """Each restart forks PID 1 while its forwarder threads run: here they are busy logging
    (no egress socket: every connection fails and says so) and every start fails at exec (the
    child's own log line), 40 times over. A child that took a lock held by a forwarder thread
    at fork time would hang, and the starts would stop."""
    runtime = {"backoff_initial_s": 0.02, "backoff_max_s": 0.02, "healthy_after_s": 30}
    cfg = box.config("", {"runtime": runtime})
    data = json.loads(cfg.read_text())
    data["command"] = ["/usr/bin/no-such-runtime"]
    cfg.write_text(json.dumps(data))
    proc = started(cfg)
    err: list[str] = []
    drain = threading.Thread(target=lambda: err.extend(proc.stderr), daemon=True)
    drain.start()
    done = threading.Event()

    def hammer() -> None:
        while not done.is_set():
            try:
                socket.create_connection(("127.0.0.1", box.port), timeout=1).close()
            except OSError:
                time.sleep(0.01)  # before the listener is up

    hammers = [threading.Thread(target=hammer, daemon=True) for _ in range(4)]
    [t.start() for t in hammers]
    try:
        rt = wait_for(
            "40 starts", lambda: (r := runtime_state(box)) and r["starts"] >= 40 and r, timeout=30
        )
    finally:
        done.set()
    assert rt["last_exit"]["code"] == 127 and rt["restarts"] >= 39
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0
    drain.join(timeout=5)
    text = "".join(err)
    assert text.count("agent: cannot start '/usr/bin/no-such-runtime'") >= 40
    assert text.count("forwarder: cannot reach egress socket") > 40


def test_a_removed_checkin_file_fails_closed(box: Box, started: Any) -> None:
    check_in(box)
    checkin = {"path": str(box.checkin), "after_s": 30}
    proc = started(box.config(SLEEPER, {"runtime": {"restart": "always"}, "checkin": checkin}))
    pid = started_pid(box, 1)
    box.checkin.unlink()
    wait_for("the runtime stopped", lambda: not alive(pid), 3)
    rt = in_state(box, "fail_closed")
    assert rt["reason"] == "control plane silent: no check-in file (fail_closed_after=30)"
    _rc, err = stop(proc)
    assert f"{rt['reason']}: runtime stopped" in err
