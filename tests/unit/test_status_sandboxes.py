"""`appliance status` sections `sandboxes` and `approvals`: store records, kill-switch hold, proxy
pid files and the proxies' admin sockets; never raising, never starting Podman."""

from __future__ import annotations

import asyncio
import os
import pwd
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from appliance.cli.status import render
from appliance.config import ApplianceConfig, SandboxConfig
from appliance.ops import status as status_mod
from appliance.ops.status import approvals_section, gather, sandboxes_section
from appliance.store import open_store
from appliance.store.db import DB_NAME
from appliance.store.sandbox_store import SandboxStore
from hardware.snapshot import HostSnapshot
from sandbox.lifecycle.errors import PodmanUnavailable
from sandbox.proxy import AdminServer, ApprovalBroker
from tests.conftest import FIXTURES

HOST = HostSnapshot.model_validate_json((FIXTURES / "hosts" / "h100_80gb_x1.json").read_text())
ME = pwd.getpwuid(os.geteuid()).pw_name  # a service user that exists, whose Podman is not up


def make_config(tmp_path: Path, user: str = ME) -> ApplianceConfig:
    return ApplianceConfig(state_dir=tmp_path / "state", sandbox=SandboxConfig(service_user=user))


def add_boxes(config: ApplianceConfig, *boxes: tuple[str, str]) -> None:
    with open_store(config.state_dir) as store:
        for name, state in boxes:
            SandboxStore(store).upsert(name, image="img", command=["sleep", "1"], state=state)


def private(config: ApplianceConfig, name: str) -> Path:
    path = config.state_dir / "sandboxes" / name  # SandboxPaths.private
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture
def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# -- no store, no sandboxes ----------------------------------------------------------------------


def test_no_store_is_empty_and_creates_nothing(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    assert sandboxes_section(config, HOST) == {
        "count": 0,
        "by_state": {},
        "held": None,
        "podman": None,
        "sandboxes": [],
        "error": None,
    }
    assert approvals_section(config, HOST) == {"count": 0, "pending": [], "errors": []}
    assert not (config.state_dir / DB_NAME).exists()


def test_no_sandboxes_never_imports_the_manager(tmp_path: Path) -> None:
    """The cheap path: a store without records answers before podman-py is imported."""
    config = make_config(tmp_path, user="no-such-user-here")
    open_store(config.state_dir).close()
    code = (
        "import sys; from appliance.config import ApplianceConfig; "
        "from appliance.ops import status; "
        f"c = ApplianceConfig(state_dir={str(config.state_dir)!r}); "
        "print(status.sandboxes_section(c, None)['count'], status.approvals_section(c, None)); "
        "print(sorted(m for m in sys.modules if m in HEAVY))"
    )
    heavy = "HEAVY = {'podman', 'sandbox.lifecycle.manager', 'appliance.store.sandbox_store'}; "
    out = subprocess.run(
        [sys.executable, "-c", heavy + code], capture_output=True, text=True, check=True
    )
    assert out.stdout.splitlines() == ["0 {'count': 0, 'pending': [], 'errors': []}", "[]"]


def test_hold_is_reported_without_sandboxes(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    with open_store(config.state_dir) as store:
        SandboxStore(store).hold("incident 42")
    assert sandboxes_section(config, HOST)["held"] == "incident 42"


# -- sandboxes -----------------------------------------------------------------------------------


def test_records_states_hold_and_proxies(tmp_path: Path, dead_pid: int) -> None:
    config = make_config(tmp_path)
    add_boxes(config, ("alpha", "running"), ("beta", "stopped"), ("gamma", "running"))
    (private(config, "alpha") / "proxy.pid").write_text(f"{os.getpid()}\n")
    (private(config, "beta") / "proxy.pid").write_text(f"{dead_pid}\n")
    with open_store(config.state_dir) as store:
        SandboxStore(store).hold("budget")
    section = sandboxes_section(config, HOST)
    assert section["count"] == 3 and section["error"] is None
    assert section["by_state"] == {"running": 2, "stopped": 1}
    assert section["held"] == "budget"
    assert section["podman"] == "down"  # this user's Podman service is not running
    assert section["sandboxes"] == [
        {"name": "alpha", "state": "running", "container": None, "proxy_alive": True},
        {"name": "beta", "state": "stopped", "container": None, "proxy_alive": False},
        {"name": "gamma", "state": "running", "container": None, "proxy_alive": False},
    ]


def test_without_service_user_reports_store_state(tmp_path: Path) -> None:
    config = make_config(tmp_path, user="no-such-user-here")
    add_boxes(config, ("alpha", "running"))
    section = sandboxes_section(config, HOST)
    assert section["podman"] == "unavailable" and section["error"] is None
    assert section["sandboxes"] == [
        {"name": "alpha", "state": "running", "container": None, "proxy_alive": None}
    ]
    approvals = approvals_section(config, HOST)
    assert approvals["count"] == 0
    assert approvals["errors"] == [
        "HostNotReady: sandbox service user 'no-such-user-here' does not exist"
    ]


def test_status_never_starts_podman(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    add_boxes(config, ("alpha", "running"))
    with open_store(config.state_dir) as store:
        manager = status_mod._manager(config, store)
        with pytest.raises(PodmanUnavailable, match="not running"):
            manager.podman.start()
        # list() takes the refusal as "Podman unavailable" and answers from the store
        assert [(r["name"], r["state"]) for r in manager.list()] == [("alpha", "running")]


class FakePodman:
    def is_running(self) -> bool:
        return True


class FakeManager:
    """SandboxManager's list() and paths() as Podman would answer them when it is up."""

    podman = FakePodman()

    def __init__(self, config: ApplianceConfig) -> None:
        self.config = config

    def list(self) -> list[dict[str, Any]]:
        return [{"name": "alpha", "container": "running"}, {"name": "beta", "container": "exited"}]

    def paths(self, name: str) -> Any:
        from sandbox.lifecycle.manager import SandboxPaths

        return SandboxPaths(root=Path("/nonexistent"), private=private(self.config, name))


def test_container_status_when_podman_is_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = make_config(tmp_path)
    add_boxes(config, ("alpha", "running"), ("beta", "running"), ("gamma", "creating"))
    monkeypatch.setattr(status_mod, "_manager", lambda config, store: FakeManager(config))
    section = sandboxes_section(config, HOST)
    assert section["podman"] == "running"
    assert [(b["name"], b["container"]) for b in section["sandboxes"]] == [
        ("alpha", "running"),
        ("beta", "exited"),
        ("gamma", None),
    ]


def test_podman_failing_mid_list_keeps_the_store_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = make_config(tmp_path)
    add_boxes(config, ("alpha", "running"))

    class Flaky(FakeManager):
        def list(self) -> list[dict[str, Any]]:
            raise ConnectionError("socket closed")

    monkeypatch.setattr(status_mod, "_manager", lambda config, store: Flaky(config))
    section = sandboxes_section(config, HOST)
    assert section["podman"] == "error: ConnectionError: socket closed"
    assert [(b["name"], b["container"]) for b in section["sandboxes"]] == [("alpha", None)]


def test_a_broken_store_is_reported_not_raised(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    config.state_dir.mkdir(parents=True)
    (config.state_dir / DB_NAME).write_text("not a database")
    assert "StateError" in sandboxes_section(config, HOST)["error"]
    assert "StateError" in approvals_section(config, HOST)["errors"][0]


# -- approvals -----------------------------------------------------------------------------------


@pytest.fixture
def admin(tmp_path: Path) -> Iterator[tuple[ApprovalBroker, Path, asyncio.AbstractEventLoop]]:
    """A real proxy admin server (sandbox/proxy/admin.py) for sandbox `alpha`, on its own loop."""
    sock = tmp_path / "state" / "sandboxes" / "alpha" / "proxy-admin.sock"
    sock.parent.mkdir(parents=True)
    loop = asyncio.new_event_loop()
    broker = ApprovalBroker()
    server = AdminServer(broker, sock)
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(server.start(), loop).result(5)
    try:
        yield broker, sock, loop
    finally:
        asyncio.run_coroutine_threadsafe(server.close(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


def request(loop: asyncio.AbstractEventLoop, broker: ApprovalBroker, host: str) -> None:
    async def ask() -> None:
        broker.request("alpha", host, 443)

    asyncio.run_coroutine_threadsafe(ask(), loop).result(5)


def test_pending_approvals_from_the_admin_socket(tmp_path: Path, admin: Any) -> None:
    broker, _sock, loop = admin
    config = make_config(tmp_path)
    add_boxes(config, ("alpha", "running"), ("beta", "running"))  # beta: no proxy socket
    request(loop, broker, "first.example")
    time.sleep(0.05)
    request(loop, broker, "second.example")
    section = approvals_section(config, HOST)
    assert section["count"] == 2 and section["errors"] == []
    first, second = section["pending"]  # the longest wait first
    assert (first["sandbox"], first["host"], first["port"]) == ("alpha", "first.example", 443)
    assert second["host"] == "second.example"
    assert first["waiting_s"] >= second["waiting_s"] >= 0
    assert {p["id"] for p in section["pending"]} == {p.id for p in broker.list_pending()}


def test_stale_and_wedged_admin_sockets_are_errors_not_hangs(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    add_boxes(config, ("stale", "running"), ("wedged", "running"))
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(private(config, "stale") / "proxy-admin.sock"))
    stale.close()  # the file stays, nobody listens: connection refused
    wedged = socket.socket(socket.AF_UNIX)
    wedged.bind(str(private(config, "wedged") / "proxy-admin.sock"))
    wedged.listen()  # accepts (backlog) but never answers
    try:
        start = time.monotonic()
        section = approvals_section(config, HOST)
        elapsed = time.monotonic() - start
    finally:
        wedged.close()
    assert section["count"] == 0
    assert [e.split(":")[0] for e in section["errors"]] == ["stale", "wedged"]
    assert elapsed < 1.5


# -- the whole report and the screen -------------------------------------------------------------


def test_gather_has_both_sections(tmp_path: Path) -> None:
    report = gather(make_config(tmp_path), HOST)
    assert report["sandboxes"]["count"] == 0 and report["approvals"]["count"] == 0


def screen(report: dict[str, Any]) -> str:
    console = Console(width=120, record=True, file=open(os.devnull, "w"))  # noqa: SIM115
    console.print(render(report, HOST))
    return console.export_text()


def test_render_with_sandboxes_and_approvals(tmp_path: Path) -> None:
    report = gather(make_config(tmp_path), HOST)
    report["sandboxes"] = {
        "count": 2,
        "by_state": {"running": 1, "stopped": 1},
        "held": "incident [42]",  # markup-like text must not break the screen
        "podman": "running",
        "sandboxes": [
            {"name": "alpha", "state": "running", "container": "running", "proxy_alive": True},
            {"name": "beta", "state": "stopped", "container": None, "proxy_alive": None},
        ],
        "error": None,
    }
    report["approvals"] = {
        "count": 1,
        "pending": [
            {"id": "ab12", "sandbox": "alpha", "host": "x.example", "port": 443, "waiting_s": 7.4}
        ],
        "errors": ["beta: TimeoutError: timed out"],
    }
    text = screen(report)
    assert "sandboxes  2 (1 running, 1 stopped) · podman running" in text
    assert "kill switch held: incident [42]" in text
    assert "alpha  running  container running  proxy up" in text
    assert "beta  stopped  container not checked  proxy ?" in text
    assert "approvals  1 pending" in text
    assert "ab12  alpha  x.example:443  waiting 7 s" in text
    assert "beta: TimeoutError: timed out" in text


def test_render_without_sandboxes(tmp_path: Path) -> None:
    text = screen(gather(make_config(tmp_path), HOST))
    assert "sandboxes  none" in text and "approvals" not in text
