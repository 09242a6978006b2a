"""Reconciliation after a control-plane restart, and the kill switch's deadline, on real Podman.

Each test breaks something the way a crash or a reboot would (an egress proxy killed, a container
stopped or removed behind the control plane's back, a labelled container with no record) and
checks that `SandboxManager.reconcile` repairs it with no sandbox lost or duplicated.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from sandbox.lifecycle.errors import SandboxConflict
from sandbox.lifecycle.manager import STOP_TIMEOUT_S, SandboxManager, read_policy_file
from tests.sandbox_fixtures import ensure_base_image, sandbox_manager, sandbox_skip_reason
from tests.security.test_escape_battery import POLICIES

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# An agent that ignores SIGTERM: only the SIGKILL after the stop timeout ends it.
STUBBORN = ["python3", "-c", "import signal, time; signal.signal(15, 1); time.sleep(999)"]


@pytest.fixture
def manager():
    if (why := sandbox_skip_reason()) is not None:
        pytest.skip(why)
    ensure_base_image()
    with sandbox_manager("lc-") as m:
        yield m


def _name(tag: str) -> str:
    return f"lc-{tag}-{os.getpid()}"


def test_reconcile_repairs_what_a_restart_or_crash_broke(manager: SandboxManager) -> None:
    policy = read_policy_file(POLICIES / "default.yaml")
    proxy_dead, stopped, removed = _name("proxy"), _name("stopped"), _name("removed")
    for name in (proxy_dead, stopped, removed):
        manager.create(name, policy, None)

    # The egress proxy crashed; the host rebooted under a container; a container was removed.
    old_pid = manager._proxy_running(manager.paths(proxy_dead))
    assert old_pid is not None
    os.kill(old_pid, signal.SIGKILL)
    manager.container(stopped).stop(timeout=1)
    manager.container(removed).remove(force=True)
    # And a labelled container the store does not know (a crash between create and record).
    orphan = _name("orphan")
    manager._client().containers.create(
        image="localhost/appliance-base:latest",
        name=orphan,
        command=["true"],
        labels={"appliance.sandbox": orphan, "appliance.state": manager.instance},
    )

    out = manager.reconcile()

    assert out.proxies_restarted == [proxy_dead]
    new_pid = manager._proxy_running(manager.paths(proxy_dead))
    assert new_pid is not None and new_pid != old_pid
    assert (manager.paths(proxy_dead).egress / "egress.sock").is_socket()
    assert out.restarted == [stopped]
    manager.container(stopped).reload()
    assert manager.container(stopped).status == "running"
    assert manager.enforcement(stopped)["agent_started"] is True
    assert out.missing == [removed] and manager.boxes.get(removed).state == "missing"
    assert out.orphans == [orphan]
    assert not out.failed

    # A second pass changes nothing and finds exactly one container per sandbox.
    again = manager.reconcile()
    assert not again.changed
    assert sorted(again.running) == sorted([proxy_dead, stopped])
    for name in (proxy_dead, stopped):
        assert len(manager._labelled(name)) == 1

    manager.remove(orphan)  # an orphan can be removed by name, though it has no record
    assert manager._labelled(orphan) == []


def test_reconcile_respects_the_kill_switch_hold(manager: SandboxManager) -> None:
    name = _name("held")
    manager.create(name, read_policy_file(POLICIES / "default.yaml"), None)
    manager.container(name).stop(timeout=1)  # as a reboot would; the store still says running
    manager.boxes.hold("test")
    try:
        out = manager.reconcile()
    finally:
        manager.boxes.release()
    assert out.stopped == [name] and not out.restarted
    assert manager.boxes.get(name).state == "stopped"


def test_kill_stops_stubborn_agents_in_parallel_within_5_s(manager: SandboxManager) -> None:
    policy = read_policy_file(POLICIES / "default.yaml")
    names = [_name(f"stubborn{i}") for i in range(3)]
    for name in names:
        manager.create(name, policy, STUBBORN)

    start = time.monotonic()
    stopped = manager.kill(names, hold=True, reason="test")
    elapsed = time.monotonic() - start

    try:
        assert sorted(stopped) == sorted(names)
        assert elapsed < 5.0, f"kill took {elapsed:.1f} s"
        assert elapsed > STOP_TIMEOUT_S - 0.5  # they did ignore SIGTERM: SIGKILL ended them
        for name in names:
            container = manager.container(name)
            assert container.status in ("exited", "stopped")
            assert manager._proxy_running(manager.paths(name)) is None
        with pytest.raises(SandboxConflict, match="held by the kill switch"):
            manager.start(names[0])
    finally:
        manager.boxes.release()


def test_podmans_errors_are_told_apart_by_type_not_by_text(manager: SandboxManager) -> None:
    """podman-py's 409 APIError and NotFound, not message text: a name Podman already has (made
    by hand, or by another state dir) is a conflict that leaves nothing behind; a container
    removed behind the control plane's back is stopped by the kill switch and removed by `rm`."""
    policy = read_policy_file(POLICIES / "default.yaml")
    taken, gone = _name("taken"), _name("gone")
    client = manager._client()
    client.containers.create(image="localhost/appliance-base:latest", name=taken, command=["true"])
    try:
        with pytest.raises(SandboxConflict, match="did not create") as info:
            manager.create(taken, policy, None)
        assert f"podman rm -f {taken}" in (info.value.hint or "")
        assert manager.boxes.get(taken) is None  # the record and everything else undone
        assert not manager.paths(taken).private.exists() and not manager.paths(taken).root.exists()
    finally:
        client.containers.get(taken).remove(force=True)

    manager.create(gone, policy, None)
    manager.container(gone).remove(force=True)
    assert manager.kill([gone], hold=False, reason="test") == [gone]
    assert manager.boxes.get(gone).state == "stopped"
    manager.remove(gone)
    assert manager.boxes.get(gone) is None


def test_exec_runs_inside_the_agents_landlock_domain(manager: SandboxManager) -> None:
    name = _name("exec")
    manager.create(name, read_policy_file(POLICIES / "default.yaml"), None)
    # sandbox.json is world-readable on disk (0644): only Landlock keeps the agent out of it.
    code, out, err = manager.exec(name, ["cat", "/run/appliance/config/sandbox.json"])
    assert code != 0 and b"Permission denied" in err, (code, out, err)
    code, out, _ = manager.exec(
        name, ["sh", "-c", "echo hi > /home/agent/f && cat /home/agent/f && id -u"]
    )
    assert (code, out.split()) == (0, [b"hi", b"1000"])
    code, out, _ = manager.exec(name, ["sh", "-c", 'echo "$X $HTTP_PROXY"'], env={"X": "y"})
    assert out.strip() == b"y http://127.0.0.1:3128"
