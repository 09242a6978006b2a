"""The monthly hard-stop hook: which keys map to a sandbox, and what reaches the kill switch."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from appliance.config import ApplianceConfig
from appliance.control.killswitch import control_plane_hooks, kill_hook, sandbox_for_key
from appliance.errors import NotFoundError
from appliance.store.inference_store import InferenceStore
from inference.ports import KeyRecord


def key(name: str, owner: Any = "sandbox") -> KeyRecord:
    return KeyRecord(id="key_0123", name=name, owner_kind=owner, created_at=0.0)


class FakeManager:
    def __init__(self, fail: Exception | None = None) -> None:
        self.calls: list[tuple[list[str], bool, str]] = []
        self.opened = 0
        self.fail = fail

    @contextmanager
    def open(self) -> Iterator[FakeManager]:
        self.opened += 1
        yield self

    def kill(self, names: list[str], hold: bool, reason: str) -> list[str]:
        self.calls.append((names, hold, reason))
        if self.fail is not None:
            raise self.fail
        return names


@pytest.mark.parametrize(
    ("name", "owner", "sandbox"),
    [
        ("sandbox-demo", "sandbox", "demo"),
        ("sandbox-a-b.c", "sandbox", "a-b.c"),
        ("sandbox-sandbox-x", "sandbox", "sandbox-x"),
        ("sandbox-", "sandbox", None),
        ("demo", "sandbox", None),
        ("Sandbox-demo", "sandbox", None),
        ("sandbox-demo", "client", None),  # a client key that merely looks like one
    ],
)
def test_sandbox_for_key(name: str, owner: str, sandbox: str | None) -> None:
    assert sandbox_for_key(key(name, owner)) == sandbox


def test_hook_kills_the_keys_sandbox_without_hold() -> None:
    fake = FakeManager()
    kill_hook(fake.open)(key("sandbox-demo"))
    assert fake.calls == [
        (["demo"], False, "monthly budget hard stop for key sandbox-demo (key_0123)")
    ]


def test_hook_ignores_client_keys() -> None:
    fake = FakeManager()
    kill_hook(fake.open)(key("ci-runner", "client"))
    assert fake.calls == [] and fake.opened == 0


def test_hook_failure_is_logged_and_audited_never_raised(caplog: pytest.LogCaptureFixture) -> None:
    audited: list[tuple[str, dict[str, Any]]] = []
    fake = FakeManager(fail=RuntimeError("podman is down"))
    kill_hook(fake.open, lambda event, **f: audited.append((event, f)))(key("sandbox-demo"))
    assert "killing sandbox demo failed" in caplog.text
    assert audited == [
        (
            "hard_stop.kill_failed",
            {
                "sandbox": "demo",
                "key_id": "key_0123",
                "key_name": "sandbox-demo",
                "error": "podman is down",
            },
        )
    ]


def test_hook_survives_a_failing_audit_and_opener(caplog: pytest.LogCaptureFixture) -> None:
    def broken_opener() -> Any:
        raise OSError("no store")

    def broken_audit(event: str, **fields: Any) -> None:
        raise OSError("disk full")

    kill_hook(broken_opener, broken_audit)(key("sandbox-demo"))
    assert "auditing the failed kill of demo failed" in caplog.text


def test_real_hooks_audit_a_kill_for_an_unknown_sandbox(tmp_path: Path) -> None:
    """The wiring `serve gateway` uses, on a store without that sandbox: no Podman is touched,
    the kill switch still records the attempt with its reason."""
    config = ApplianceConfig(state_dir=tmp_path / "state")
    (hook,) = control_plane_hooks(config).on_hard_stop
    hook(key("sandbox-ghost"))
    with InferenceStore(config.state_dir) as store:
        (event,) = store.audit_events("kill")
    assert event["sandboxes"] == [] and event["hold"] is False
    assert event["reason"] == "monthly budget hard stop for key sandbox-ghost (key_0123)"


def test_expected_failures_log_one_line(caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeManager(fail=NotFoundError("no sandbox named 'demo'"))
    kill_hook(fake.open)(key("sandbox-demo"))
    (record,) = caplog.records
    assert record.exc_info is None and "no sandbox named 'demo'" in record.getMessage()


def _listening(path: Path) -> socket.socket:
    path.parent.mkdir(parents=True, exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(4)
    return sock


def test_a_hung_control_plane_fails_closed(tmp_path: Path) -> None:
    """Its socket accepts and never answers: after the timeout the hook stops it directly."""
    from appliance.control.killswitch import ControlPlaneKill
    from appliance.control.paths import socket_path

    config = ApplianceConfig(state_dir=tmp_path / "state")
    direct = FakeManager()
    with _listening(socket_path(config)):
        started = time.monotonic()
        stopped = ControlPlaneKill(config, direct.open, timeout=0.5).kill(["demo"], False, "r")
    assert stopped == ["demo"] and direct.calls == [(["demo"], False, "r")]
    assert time.monotonic() - started < 5


def test_a_control_plane_that_answers_is_not_second_guessed(tmp_path: Path) -> None:
    """An error answer (no such sandbox) is the control plane's word: no direct kill after it."""
    from appliance.control.killswitch import ControlPlaneKill
    from appliance.control.paths import socket_path
    from appliance.errors import ApplianceError

    config = ApplianceConfig(state_dir=tmp_path / "state")
    direct = FakeManager()
    body = b'{"error": {"message": "no such sandbox", "type": "invalid_request"}}'
    answer = b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\n"
    answer += b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body

    with _listening(socket_path(config)) as listener:

        def serve() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.recv(65536)
                conn.sendall(answer)

        server = threading.Thread(target=serve, daemon=True)
        server.start()
        with pytest.raises(ApplianceError, match="no such sandbox"):
            ControlPlaneKill(config, direct.open, timeout=5).kill(["demo"], False, "r")
        server.join(5)
    assert direct.calls == [] and direct.opened == 0
