"""The transport to an agent's runtime (appliance/control/turn_events.py AgentSocketTransport), on
real unix sockets: it reaches the agent socket only when the path is a socket (the directory is
the agent's; root connects), and once interrupted it makes no more requests and cuts the one in
flight, which a real adapter's wait for readiness lets through."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from appliance.control.turn_events import (
    AgentSocketRefused,
    AgentSocketTransport,
    TurnInterrupted,
)
from blueprints.runtimes.responses import wait_ready


@contextmanager
def listening(path: Path, answer: bytes | None) -> Iterator[list[bytes]]:
    """A unix socket answering every request with `answer` (None: never answers); the requests
    it was sent."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen()
    seen: list[bytes] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                seen.append(conn.recv(65536))
                if answer is None:
                    stop.wait(10)
                else:
                    conn.sendall(answer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        stop.set()
        server.shutdown(socket.SHUT_RDWR)
        server.close()
        thread.join(5)


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
NOT_READY = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


def client(path: Path) -> httpx.Client:
    return httpx.Client(transport=AgentSocketTransport(path), base_url="http://agent", timeout=10)


def test_the_agent_socket_is_reached(tmp_path: Path) -> None:
    path = tmp_path / "agent.sock"
    with listening(path, OK) as seen, client(path) as http:
        assert http.get("/readyz").text == "ok"
    assert seen[0].startswith(b"GET /readyz ")


def test_a_symlink_to_another_socket_is_refused_and_not_followed(tmp_path: Path) -> None:
    other = tmp_path / "host-service.sock"
    path = tmp_path / "agent.sock"
    path.symlink_to(other)
    with listening(other, OK) as seen, client(path) as http:
        with pytest.raises(AgentSocketRefused, match=f"^{path} is a symlink, not the agent"):
            http.get("/readyz")
        # Not waited out as a runtime that is starting: the wait ends at once, with the refusal.
        t0 = time.monotonic()
        with pytest.raises(AgentSocketRefused):
            wait_ready(http, "/readyz", timeout_s=30)
        assert time.monotonic() - t0 < 1
    assert seen == []


def test_a_file_or_nothing_in_place_of_the_socket(tmp_path: Path) -> None:
    path = tmp_path / "agent.sock"
    with client(path) as http:
        with pytest.raises(httpx.ConnectError, match="No such file"):  # not there yet: retried
            http.get("/readyz")
        path.write_text("")
        with pytest.raises(AgentSocketRefused, match="is not a socket"):
            http.get("/readyz")


def test_interrupted_it_cuts_the_request_in_flight_and_makes_no_more(tmp_path: Path) -> None:
    path = tmp_path / "agent.sock"
    transport = AgentSocketTransport(path)
    with (
        listening(path, None) as seen,
        httpx.Client(transport=transport, base_url="http://a") as http,
    ):
        threading.Timer(0.5, transport.interrupt).start()
        t0 = time.monotonic()
        with pytest.raises(TurnInterrupted):  # a runtime that never answers: cut at once
            http.get("/readyz", timeout=30)
        assert time.monotonic() - t0 < 2
        with pytest.raises(TurnInterrupted):
            wait_ready(http, "/readyz", timeout_s=30)
        assert time.monotonic() - t0 < 2
    assert len(seen) == 1  # nothing after the interrupt


def test_a_readiness_wait_ends_at_the_interrupt(tmp_path: Path) -> None:
    """/readyz 503 for ever (a runtime starting): interrupted, the wait ends within a poll."""
    path = tmp_path / "agent.sock"
    transport = AgentSocketTransport(path)
    with (
        listening(path, NOT_READY) as seen,
        httpx.Client(transport=transport, base_url="http://a") as http,
    ):
        threading.Timer(1.0, transport.interrupt).start()
        t0 = time.monotonic()
        with pytest.raises(TurnInterrupted):
            wait_ready(http, "/readyz", timeout_s=60)
        assert 0.9 < time.monotonic() - t0 < 2
    assert 1 <= len(seen) <= 4 and all(r.startswith(b"GET /readyz ") for r in seen)
