"""The supervisor keeping an always-on runtime up, run for real on this host
(tests/integration/supervisor_box.py): restarts with backoff, stops on SIGTERM, fails closed
when the control plane's check-in goes stale, refuses bad keys. The agent socket and the
runtime's env: test_supervisor_socket_env.py."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import threading
import time
from itertools import pairwise
from textwrap import dedent
from typing import Any

import pytest

from tests.integration.supervisor_box import (
    FAST,
    SLEEPER,
    UNUSABLE,
    Box,
    alive,
    check_in,
    in_state,
    pids,
    runtime_state,
    started_pid,
    stop,
    wait_for,
)

pytestmark = pytest.mark.integration

if UNUSABLE:
    pytest.skip(UNUSABLE, allow_module_level=True)


# -- restarts ------------------------------------------------------------------------------------


def test_a_crashed_runtime_is_restarted_and_the_report_says_why(box: Box) -> None:
    proc = box.start(box.config(SLEEPER, {"runtime": {"restart": "always", **FAST}}))
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


def test_backoff_doubles_to_its_maximum_and_resets_after_a_healthy_run(box: Box) -> None:
    # Every start exits 1 at once, except the 4th, which runs 1.2 s (healthy_after_s is 1).
    code = """
        import os, sys, time
        path = os.path.join(os.environ["WS"], "starts")
        with open(path, "a") as f: f.write(f"{time.monotonic()}\\n")
        if len(open(path).read().split()) == 4: time.sleep(1.2)
        sys.exit(1)
    """
    runtime = {"backoff_initial_s": 0.3, "backoff_max_s": 0.6, "healthy_after_s": 1.0}
    proc = box.start(box.config(code, {"runtime": runtime}))
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


def test_a_runtime_in_backoff_shows_when_it_starts_next(box: Box) -> None:
    runtime = {"backoff_initial_s": 5, "backoff_max_s": 5, "healthy_after_s": 30}
    box.start(box.config("import sys; sys.exit(4)", {"runtime": runtime}))
    rt = in_state(box, "backoff")
    assert rt["pid"] is None and rt["next_start_at"] is not None
    assert rt["reason"].startswith("runtime exited with code 4 after") and rt["restarts"] == 0
    assert rt["reason"].endswith("restart in 5 s")


@pytest.mark.parametrize("ignores_sigterm", [False, True])
def test_sigterm_stops_the_runtime_and_pid1_exits(box: Box, ignores_sigterm: bool) -> None:
    code = SLEEPER
    if ignores_sigterm:
        code = "import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN)\n" + dedent(code)
    proc = box.start(box.config(code, {"runtime": {"restart": "always", **FAST}}))
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


def test_restart_never_exits_with_the_runtime_code(box: Box) -> None:
    proc = box.start(box.config("import sys; sys.exit(5)", {"runtime": {"restart": "never"}}))
    assert proc.wait(timeout=10) == 5
    rt = runtime_state(box)
    assert rt is not None and rt["state"] == "stopped" and rt["last_exit"]["code"] == 5


def test_orphans_of_a_crashed_runtime_are_stopped_before_the_restart(box: Box) -> None:
    # Each start leaves a child in its own session (outside the runtime's process group).
    code = """
        import os, time
        child = os.fork()
        if child == 0:
            os.setsid(); time.sleep(60); os._exit(0)
        with open(os.path.join(os.environ["WS"], "pids"), "a") as f: f.write(f"{child}\\n")
        time.sleep(0.3)
    """
    box.start(box.config(code, {"runtime": {"restart": "always", **FAST}}))
    orphan = started_pid(box, 1)
    started_pid(box, 2)
    assert not alive(orphan)


# -- fail closed ---------------------------------------------------------------------------------


def test_a_stale_checkin_stops_the_runtime_and_a_fresh_one_restarts_it(box: Box) -> None:
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
    proc = box.start(box.config(SLEEPER, service))
    pid = started_pid(box, 1)
    time.sleep(after + 1.0)  # fresh check-ins: the runtime stays up past after_s
    assert alive(pid) and runtime_state(box)["state"] == "running"  # type: ignore[index]
    done.set()
    ticker.join()
    silent = last[0]
    wait_for("the runtime stopped", lambda: not alive(pid), after + 4)
    gone = time.monotonic() - silent
    assert after - 0.1 <= gone <= after + 2, gone  # mtime is a little before `silent`
    rt = in_state(box, "fail_closed", timeout=2)  # PID 1 reaps, then records it
    assert rt["fail_closed_at"]
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


def test_without_a_checkin_the_runtime_waits_then_starts_on_the_first(box: Box) -> None:
    service = {
        "runtime": {"restart": "always", **FAST},
        "checkin": {"path": str(box.checkin), "after_s": 5},
    }
    box.start(box.config(SLEEPER, service))
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


def test_an_old_checkin_file_counts_as_silence(box: Box) -> None:
    check_in(box)
    old = time.time() - 600
    os.utime(box.checkin, (old, old))
    service = {
        "runtime": {"restart": "always"},
        "checkin": {"path": str(box.checkin), "after_s": 5},
    }
    box.start(box.config(SLEEPER, service))
    in_state(box, "waiting")
    time.sleep(1.2)
    assert pids(box) == []


def test_after_s_zero_turns_fail_closed_off(box: Box) -> None:
    service = {
        "runtime": {"restart": "always"},
        "checkin": {"path": str(box.checkin), "after_s": 0},
    }
    box.start(box.config(SLEEPER, service))  # no check-in file at all
    started_pid(box, 1)
    rt = in_state(box, "running")
    assert rt["fail_closed_after"] == 0


# -- the agent socket ----------------------------------------------------------------------------


def test_restarts_while_the_forwarders_log_from_other_threads(box: Box) -> None:
    """Each restart forks PID 1 while its forwarder threads run: here they are busy logging
    (no egress socket: every connection fails and says so) and every start fails at exec (the
    child's own log line), 40 times over. A child that took a lock held by a forwarder thread
    at fork time would hang, and the starts would stop."""
    runtime = {"backoff_initial_s": 0.02, "backoff_max_s": 0.02, "healthy_after_s": 30}
    cfg = box.config("", {"runtime": runtime})
    data = json.loads(cfg.read_text())
    data["command"] = ["/usr/bin/no-such-runtime"]
    cfg.write_text(json.dumps(data))
    proc = box.start(cfg)
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


def test_a_removed_checkin_file_fails_closed(box: Box) -> None:
    check_in(box)
    checkin = {"path": str(box.checkin), "after_s": 30}
    proc = box.start(box.config(SLEEPER, {"runtime": {"restart": "always"}, "checkin": checkin}))
    pid = started_pid(box, 1)
    box.checkin.unlink()
    wait_for("the runtime stopped", lambda: not alive(pid), 3)
    rt = in_state(box, "fail_closed")
    assert rt["reason"] == "control plane silent: no check-in file (fail_closed_after=30)"
    _rc, err = stop(proc)
    assert f"{rt['reason']}: runtime stopped" in err


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
        {"agent_socket": {"path": "/run/x.sock", "port": 1, "peers": "everyone"}},
        {"checkin": {"path": "/run/checkin", "after_s": -1}},
        {"checkin": {"path": "/run/checkin"}},
        {"runtime_env_file": "env.json"},
    ],
)
def test_bad_always_on_keys_exit_2(box: Box, service: dict[str, Any]) -> None:
    proc = box.start(box.config(SLEEPER, service))
    _out, err = proc.communicate(timeout=10)
    assert proc.returncode == 2 and next(iter(service)) in err
    assert pids(box) == []


def test_hard_requirement_unmet_is_a_failed_runtime(box: Box) -> None:
    proc = box.start(box.config(SLEEPER, {"runtime": {"restart": "always"}}, min_abi=99))
    assert proc.wait(timeout=10) == 3
    rt = runtime_state(box)
    assert rt is not None and rt["state"] == "failed" and "99" in rt["reason"]
    assert box.report["agent_started"] is False and pids(box) == []
