"""The one proxy admin client (sandbox/proxy/admin_client.py, stdlib only) against servers that
misbehave: each answer maps to its own error, and a trickling server cannot outlast the timeout."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest

from sandbox.proxy.admin_client import MAX_ANSWER, AdminClient

Reply = Callable[[socket.socket, bytes], None]


@contextmanager
def server(tmp_path: Path, reply: Reply) -> Iterator[tuple[Path, list[bytes]]]:
    path = tmp_path / "admin.sock"
    seen: list[bytes] = []
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(4)

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                request = conn.recv(65536)
                seen.append(request)
                with suppress(OSError):  # the client gave up first: fine
                    reply(conn, request)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield path, seen
    finally:
        listener.close()


def answer(status: str, body: bytes) -> Reply:
    def reply(conn: socket.socket, _request: bytes) -> None:
        conn.sendall(f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)

    return reply


def test_list_approve_deny_send_what_the_server_expects(tmp_path: Path) -> None:
    body = b'{"pending": [{"id": "ab12", "host": "h", "port": 80}]}'
    with server(tmp_path, answer("200 OK", body)) as (path, seen):
        client = AdminClient(path, timeout=2)
        assert client.list() == [{"id": "ab12", "host": "h", "port": 80}]
        client.approve("ab12", persist=True)
        client.deny("a/../b")
    assert seen[0].startswith(b"GET /approvals HTTP/1.1\r\n")
    assert seen[1].startswith(b"POST /approvals/ab12/approve?persist=1 HTTP/1.1\r\n")
    assert seen[2].startswith(b"POST /approvals/a%2F..%2Fb/deny HTTP/1.1\r\n")  # one segment


def test_404_is_key_error_other_statuses_runtime_error(tmp_path: Path) -> None:
    not_found = answer("404 Not Found", b'{"error": "no pending approval \'x\'"}')
    with server(tmp_path, not_found) as (path, _), pytest.raises(KeyError, match="no pending"):
        AdminClient(path, timeout=2).approve("x")
    (tmp_path / "admin.sock").unlink()
    failed = answer("500 Error", b'{"error": "writer failed"}')
    with server(tmp_path, failed) as (path, _), pytest.raises(RuntimeError, match="writer failed"):
        AdminClient(path, timeout=2).list()


def test_not_http_and_oversized_answers_are_refused(tmp_path: Path) -> None:
    def garbage(conn: socket.socket, _request: bytes) -> None:
        conn.sendall(b"SSH-2.0-OpenSSH\r\n\r\n")

    with server(tmp_path, garbage) as (path, _), pytest.raises(RuntimeError, match="not an HTTP"):
        AdminClient(path, timeout=2).list()
    (tmp_path / "admin.sock").unlink()

    def flood(conn: socket.socket, _request: bytes) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\n\r\n" + b"x" * (MAX_ANSWER + 65536))

    with server(tmp_path, flood) as (path, _), pytest.raises(RuntimeError, match="answer over"):
        AdminClient(path, timeout=5).list()


def test_a_trickling_server_cannot_outlast_the_timeout(tmp_path: Path) -> None:
    def trickle(conn: socket.socket, _request: bytes) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\n\r\n")
        for _ in range(50):
            conn.sendall(b" ")
            time.sleep(0.05)

    with server(tmp_path, trickle) as (path, _):
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            AdminClient(path, timeout=0.5).list()
        assert time.monotonic() - started < 1.5


def test_no_socket_is_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        AdminClient(tmp_path / "none.sock", timeout=1).list()
