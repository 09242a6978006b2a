"""The control plane's transport edges, on real sockets: the CLI's client when the control plane
dies or hangs mid-request (the outcome is unknown: exit 7 saying so, never a raw httpx error),
the socket's mode without the admin group, the one-control-plane lock, and the peer's loginuid."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from appliance.config import ApplianceConfig
from appliance.control import server
from appliance.control.client import ControlClient
from appliance.control.paths import lock_path, socket_path
from appliance.errors import ConflictError, ControlPlaneNoAnswer, exit_code_for


@contextmanager
def fake_control_plane(config: ApplianceConfig, answer: bytes | None) -> Iterator[None]:
    """Accepts one request on the control socket, reads it, then sends `answer` and closes
    (b"": closes at once, as a control plane killed mid-request), or (None) hangs."""
    path = socket_path(config)
    path.parent.mkdir(parents=True, exist_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    done = threading.Event()

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            if answer is None:
                done.wait(10)
                return
            conn.sendall(answer)

    worker = threading.Thread(target=serve, daemon=True)
    worker.start()
    try:
        yield
    finally:
        done.set()
        worker.join(10)
        listener.close()


@pytest.mark.parametrize(
    ("answer", "cause"),
    [
        (b"", "RemoteProtocolError"),  # killed before answering
        (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{", "RemoteProtocolError"),  # mid-body
        (None, "ReadTimeout"),  # hung
    ],
)
def test_no_answer_is_exit_7_with_the_outcome_unknown(
    tmp_path: Path, answer: bytes | None, cause: str
) -> None:
    config = ApplianceConfig(state_dir=tmp_path / "state")
    with (
        fake_control_plane(config, answer),
        ControlClient(config, timeout=0.5) as client,
        pytest.raises(ControlPlaneNoAnswer) as caught,
    ):
        client.kill(names=["demo"], hold=False, reason="r")
    assert exit_code_for(caught.value) == 7
    message = str(caught.value)
    assert message.startswith("POST /kill: no answer from the control plane") and cause in message
    assert "unknown" in message and "`list` / `status`" in (caught.value.hint or "")


@pytest.mark.parametrize("line", [b"<html>", b"[1, 2]", b'{"no": "type"}'])
def test_a_turn_stream_line_that_is_not_an_event_is_no_answer(tmp_path: Path, line: bytes) -> None:
    """Not a bare ValueError from the NDJSON: the outcome is unknown, with a hint."""
    config = ApplianceConfig(state_dir=tmp_path / "state")
    body = b'{"type": "delta", "text": "hi"}\n' + line + b"\n"
    answer = b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
    answer += b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    with (
        fake_control_plane(config, answer),
        ControlClient(config, timeout=5) as client,
        pytest.raises(ControlPlaneNoAnswer) as caught,
    ):
        events = client.stream_turn("demo", "hello")
        assert next(events) == {"type": "delta", "text": "hi"}
        next(events)
    assert exit_code_for(caught.value) == 7
    assert str(caught.value).startswith("POST /agents/demo/turns: the turn's stream sent a line ")
    assert line.decode() in str(caught.value)
    assert "`appliance agent transcript demo`" in (caught.value.hint or "")


def test_the_cli_prints_one_line_and_a_hint_when_the_control_plane_dies(tmp_path: Path) -> None:
    from tests.helpers import cli_env

    state = tmp_path / "state"
    appliance = str(Path(sys.executable).parent / "appliance")
    with fake_control_plane(ApplianceConfig(state_dir=state), b""):
        done = subprocess.run(
            [appliance, "keys", "revoke", "laptop"],
            env=cli_env(state, tmp_path),
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 7, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 2 and lines[0].startswith("appliance: error: DELETE /keys/laptop: no")
    assert "whether it acted is unknown" in lines[0] and "Traceback" not in done.stderr
    assert lines[1].startswith("  hint: check the result with `list` / `status`")


def test_without_the_admin_group_the_socket_is_0600(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server, "ADMIN_GROUP", "no-such-group-for-this-test")
    path = tmp_path / "run" / "control.sock"
    with server.bind_unix(path):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_group_this_user_may_not_give_the_socket_to_leaves_it_0600(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A non-root user outside appliance-admin: chown fails; no crash, the socket stays 0600."""

    def refused(*_: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(server, "ADMIN_GROUP", "root")  # a group that exists everywhere
    monkeypatch.setattr(server.os, "chown", refused)
    path = tmp_path / "run" / "control.sock"
    with server.bind_unix(path):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_one_control_plane_per_state_dir(tmp_path: Path) -> None:
    """The lock is the process's: a second holder is refused (exit 10) with the first's pid,
    and once the first lets go (its process ends, even by kill -9) the next one gets it."""
    path = lock_path(ApplianceConfig(state_dir=tmp_path / "state"))
    held = server.hold_lock(path)
    try:
        with pytest.raises(ConflictError) as caught:
            server.hold_lock(path)
        assert f"pid {os.getpid()}" in str(caught.value) and exit_code_for(caught.value) == 10
        assert "appliance status" in (caught.value.hint or "")
    finally:
        os.close(held)
    os.close(server.hold_lock(path))


def test_a_peer_carries_its_loginuid_when_the_kernel_has_one(tmp_path: Path) -> None:
    """Whatever this test process's loginuid is: recorded when set, absent when unset."""
    try:
        raw = int(Path("/proc/self/loginuid").read_text())
    except (OSError, ValueError):
        raw = server.UNSET_LOGINUID
    expected = None if raw == server.UNSET_LOGINUID else raw
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        peer = server.peer_credentials(a)
    assert peer is not None and peer.pid == os.getpid() and peer.loginuid == expected
    fields = peer.principal().audit_fields()
    assert fields.get("actor_loginuid") == expected
    assert ("actor_loginuid" in fields) is (expected is not None)
    assert server.loginuid(2**22 + 7) is None  # no such process


def test_connections_on_the_loopback_port_have_tcp_nodelay() -> None:
    """asyncio sets TCP_NODELAY only on sockets made with IPPROTO_TCP named; without it a
    response written in two pieces waited ~40 ms for the client's delayed ACK (bench_console)."""
    import asyncio

    async def check() -> int:
        seen: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        async def handle(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            sock = writer.get_extra_info("socket")
            seen.set_result(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        listener = server.bind_tcp("127.0.0.1", 0)
        port = listener.getsockname()[1]
        async with await asyncio.start_server(handle, sock=listener):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            value = await asyncio.wait_for(seen, 5)
            writer.close()
            return value

    assert asyncio.run(check()) != 0
