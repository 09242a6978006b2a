"""Sandboxes, approvals and the kill switch through a real control plane (`appliance serve
control`, a subprocess) with real rootless Podman sandboxes and their egress proxies:

- concurrency is the control plane's: ten approvals of one pending request give one success and
  nine 409s (through the API, and through ten CLI processes: one exit 0, nine exit 10); five
  `sandbox create X` at once make one sandbox (four exit 10) and nothing half-made;
- the control plane killed with SIGKILL and started again: the same sandboxes, one live proxy
  each (a proxy that died meanwhile is restarted by the reconciler at start), the same pending
  approvals;
- hostile input through the API: bad names, policy errors -> 422 naming file:line, nothing made;
- the kill switch through it.
test_control_isolation.py: the sandbox never reaches the control plane.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.integration.control_lab import CONFLICT_EXIT, POLICIES, Plane, started_plane
from tests.sandbox_fixtures import (
    APPLIANCE,
    podman_client,
    proxy_pids,
    sandbox_skip_reason,
    service_home,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

if (_why := sandbox_skip_reason()) is not None:
    pytest.skip(_why, allow_module_level=True)


@pytest.fixture(scope="module")
def plane() -> Iterator[Plane]:
    with started_plane("cs-") as p:
        yield p


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
        assert unknown.returncode == 5 and "no-such-box: no such sandbox" in unknown.stderr
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


def test_execs_that_fill_their_lane_leave_the_kill_switch_answering(
    plane: Plane, holder: str
) -> None:
    """More `sleep` execs than anyio's default pool has threads (40): the lane runs a few and
    refuses the rest with 429 at once, and /kill, /release and /status answer meanwhile."""
    answers: list[httpx.Response] = []

    def sleeper() -> None:
        with plane.api() as api:
            answers.append(api.post(f"/sandboxes/{holder}/exec", json={"argv": ["sleep", "15"]}))

    flood = [threading.Thread(target=sleeper) for _ in range(44)]
    for t in flood:
        t.start()
    deadline = time.monotonic() + 30
    while sum(a.status_code == 429 for a in answers) < 44 - 8:  # refused at once
        assert time.monotonic() < deadline, [a.status_code for a in answers]
        time.sleep(0.1)
    with plane.api() as api:
        started = time.monotonic()
        kill = api.post("/kill", json={"names": ["no-such-box"]}, timeout=5)
        release = api.post("/release", timeout=5)
        status = api.get("/status", timeout=10)
        took = time.monotonic() - started
    for t in flood:
        t.join(60)
    assert kill.status_code == 404 and release.status_code == 200 and status.status_code == 200
    assert took < 10, took
    busy = next(a for a in answers if a.status_code == 429).json()["error"]
    assert busy["type"] == "busy" and busy["hint"]
    assert sorted(a.status_code for a in answers) == [200] * 8 + [429] * 36
    assert plane.states()[holder] == "running"


def _peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_an_endless_exec_is_truncated_and_memory_stays_bounded(plane: Plane, holder: str) -> None:
    assert plane.proc is not None
    before = _peak_rss_mib(plane.proc.pid)
    started = time.monotonic()
    out = plane.cli("sandbox", "exec", holder, "--", "yes", ok=False, timeout=120)
    assert time.monotonic() - started < 60
    assert len(out.stdout) == 8 << 20 and set(out.stdout.splitlines()) == {"y"}
    assert "warning: the output was truncated at 8 MiB" in out.stderr
    assert out.returncode != 0
    grown = _peak_rss_mib(plane.proc.pid) - before
    assert grown < 160, f"the control plane grew {grown:.0f} MiB for 8 MiB of output"
    deadline = time.monotonic() + 10
    while subprocess.run(["pgrep", "-x", "yes"], capture_output=True).returncode == 0:
        assert time.monotonic() < deadline, "`yes` still runs in the sandbox"
        time.sleep(0.2)


def test_logs_are_tailed_and_an_unchanged_policy_is_the_same_revision(
    plane: Plane, holder: str
) -> None:
    with plane.api() as api:
        assert api.get(f"/sandboxes/{holder}/logs", params={"tail": 0}).json()["logs"] == ""
        assert api.get(f"/sandboxes/{holder}/logs", params={"tail": -1}).status_code == 422
        shown = api.get(f"/sandboxes/{holder}/policy").json()
        text = yaml.safe_dump(shown["policy"])
        for _ in range(3):
            again = api.put(f"/sandboxes/{holder}/policy", json={"policy": text, "source": "p"})
            assert again.status_code == 200 and again.json() == {"rev": shown["rev"]}, again.text
        assert api.get(f"/sandboxes/{holder}/policy").json() == shown
    one = plane.cli("sandbox", "logs", holder, "--tail", "1").stdout
    assert len(one.splitlines()) <= 1


def test_kill_hold_during_a_create_leaves_nothing_running(plane: Plane) -> None:
    """The kill switch takes no name lock: pulled while a sandbox is being made, it stops the
    record's proxy and container as far as they exist, and the create fails and undoes itself
    (what this test mostly hits), or completes and then stops what it started (the window
    before the record exists, too narrow to aim at here). Either way the create answers 409
    naming the hold, the kill 200, and nothing runs under the hold."""
    import sqlite3

    name = f"cs-killrace-{os.getpid()}"
    plane.created.add(name)
    policy = (POLICIES / "default.yaml").read_text()
    answers: list[httpx.Response] = []

    def create() -> None:
        with plane.api() as api:
            answers.append(api.post("/sandboxes", json={"name": name, "policy": policy}))

    def recorded() -> bool:
        with sqlite3.connect(plane.state / "appliance.db") as db:
            return db.execute("SELECT 1 FROM sandboxes WHERE name = ?", (name,)).fetchone()

    maker = threading.Thread(target=create)
    maker.start()
    deadline = time.monotonic() + 30
    while not recorded():  # the create has begun: its record exists, its container may not
        assert time.monotonic() < deadline and maker.is_alive(), "the create never began"
        time.sleep(0.005)
    try:
        with plane.api() as api:
            kill = api.post("/kill", json={"all": True, "hold": True})
        assert kill.status_code == 200 and kill.json()["hold"] is True, kill.text
        maker.join(120)
        (answer,) = answers
        assert answer.status_code == 409, answer.text
        # Either way the answer names the hold: "... the kill switch held while it started" (the
        # create undid itself) or "... was stopped as it started: the kill switch holds".
        message = answer.json()["error"]["message"]
        assert "the kill switch held" in message or "the kill switch holds" in message, message
        state = plane.states().get(name)
        assert state in (None, "stopped"), (state, answer.text)
        assert not proxy_pids(name, plane.state)
        running = [c for c in podman_client().containers.list() if c.name == name]
        assert running == []
    finally:
        plane.cli("release")
        if name in plane.states():
            plane.cli("sandbox", "rm", name)
