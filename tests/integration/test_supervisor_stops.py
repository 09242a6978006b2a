"""How the supervisor stops an always-on runtime, run for real on this host
(tests/integration/supervisor_box.py): SIGTERM (a container stop) in every state with no runtime
running, grandchildren that left the runtime's process group, and the previous run's report."""

from __future__ import annotations

import json
import os
import time
from typing import Any

import pytest

from tests.integration.supervisor_box import (
    AGENT_UID,
    AS_ROOT,
    FAST,
    SLEEPER,
    UNUSABLE,
    Box,
    alive,
    check_in,
    in_state,
    runtime_state,
    started_pid,
    stop,
    wait_for,
)

pytestmark = pytest.mark.integration

if UNUSABLE:
    pytest.skip(UNUSABLE, allow_module_level=True)


def _idle(box: Box, state: str) -> dict[str, Any]:
    """sandbox.json keys that leave the runtime in `state`, with no process running."""
    checkin = {"path": str(box.checkin), "after_s": 1}
    if state == "backoff":  # exits at once, restart in 30 s
        runtime = {"backoff_initial_s": 30, "backoff_max_s": 30, "healthy_after_s": 60}
        return {"runtime": runtime}
    if state == "waiting":  # no check-in file at all
        return {"runtime": {"restart": "always", **FAST}, "checkin": checkin}
    check_in(box)  # fail_closed: one check-in, then silence for longer than after_s
    return {"runtime": {"restart": "always", **FAST}, "checkin": checkin}


@pytest.mark.parametrize("state", ["backoff", "waiting", "fail_closed"])
def test_sigterm_with_no_runtime_running_exits_0_at_once(box: Box, state: str) -> None:
    code = "import sys; sys.exit(4)" if state == "backoff" else SLEEPER
    proc = box.start(box.config(code, _idle(box, state)))
    before = in_state(box, state, timeout=6)
    assert before["pid"] is None
    t0 = time.monotonic()
    rc, err = stop(proc)
    assert rc == 0 and time.monotonic() - t0 < 2, (rc, err)
    rt = runtime_state(box)
    assert rt is not None and rt["state"] == "stopped" and rt["pid"] is None
    assert rt["reason"] == "supervisor stopping on SIGTERM"
    assert rt["starts"] == before["starts"] and rt["last_exit"] == before["last_exit"]
    assert "runtime stopped: supervisor stopping on SIGTERM" in err


# Each start leaves two processes outside the runtime's process group, both ignoring SIGTERM:
# a child in its own session, and a double-forked grandchild (its parent exits at once, so it
# is PID 1's child while the runtime still runs). Their pids go to ws/escaped.
ESCAPING = """
    import os, signal, time
    def escape(double):
        if os.fork() == 0:
            os.setsid()
            if double and os.fork() != 0:
                os._exit(0)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            with open(os.path.join(os.environ["WS"], "escaped"), "a") as f:
                f.write(f"{os.getpid()}\\n")
            time.sleep(120)
            os._exit(0)
    escape(False)
    escape(True)
    with open(os.path.join(os.environ["WS"], "pids"), "a") as f: f.write(f"{os.getpid()}\\n")
    time.sleep(120)
"""


@pytest.mark.parametrize("how", ["fail_closed", "sigterm"])
def test_escaped_grandchildren_do_not_survive_a_stop(box: Box, how: str) -> None:
    checkin = {"path": str(box.checkin), "after_s": 2}
    check_in(box)
    service = {"runtime": {"restart": "always", **FAST}, "checkin": checkin}
    proc = box.start(box.config(ESCAPING, service))
    runtime = started_pid(box, 1)
    path = box.ws / "escaped"
    escaped = wait_for(
        "2 escaped", lambda: path.exists() and len(s := path.read_text().split()) == 2 and s
    )
    escaped_pids = [int(p) for p in escaped]
    assert all(os.getpgid(p) not in (os.getpgid(runtime), 0) for p in escaped_pids)
    if how == "fail_closed":  # no more check-ins: fails closed within ~2 s
        in_state(box, "fail_closed", timeout=6)
        assert proc.poll() is None
    else:
        assert stop(proc)[0] == 0
    assert not alive(runtime)
    left = [p for p in escaped_pids if alive(p)]
    assert left == [], f"escaped processes survived the {how} stop: {left}"


def test_a_previous_runs_report_is_never_current(box: Box) -> None:
    """A report left by the last run (a container stopped or killed) is gone as soon as the next
    run's PID 1 starts: here it then exits 2 before writing one (a bad runtime env file)."""
    report = box.report_dir / "enforcement.json"
    stale = {"agent_started": True, "runtime": {"state": "running", "pid": 12}}
    report.write_text(json.dumps(stale))
    if AS_ROOT:
        os.chown(report, AGENT_UID, AGENT_UID)
    box.runtime_env.write_text("[]")
    service = {"runtime": {"restart": "always"}, "runtime_env_file": str(box.runtime_env)}
    proc = box.start(box.config(SLEEPER, service))
    _out, err = proc.communicate(timeout=10)
    assert proc.returncode == 2, err
    assert not report.exists()
