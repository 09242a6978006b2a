"""The backend supervisor tells busy from dead, and keeps each restart's reason (issue 11).

The supervisor runs for real here; only the backend is a stand-in with scripted health answers
(the real ProcessBackend.probe is checked against real sockets below).
"""

from __future__ import annotations

import http.server
import logging
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from inference.backends import Backoff, ProcessBackend, Supervisor
from inference.backends.supervisor import RESTART_HISTORY
from tests.helpers import free_port


class ScriptedBackend:
    """A Launchable whose probe answers come from `script` (then `then`, forever)."""

    name = "backend"

    def __init__(self, script: list[str], then: str = "ok", exits: int | None = None) -> None:
        self.script = list(script)
        self.then = then
        self.exit_code = exits
        self.launches = 0
        self._running = False

    @property
    def returncode(self) -> int | None:
        return self.exit_code if self._running and self.exit_code is not None else None

    def launch(self, timeout: float, progress=None, cancel=None) -> None:
        self.launches += 1
        self._running = True
        if self.launches > 1:
            self.exit_code = None  # a restart cures it

    def health(self, timeout: float = 2.0) -> bool:
        return self.probe(timeout) == "ok"

    def probe(self, timeout: float = 2.0) -> str:
        return self.script.pop(0) if self.script else self.then

    def stop(self, grace: float = 10.0) -> None:
        self._running = False


def run(backend: ScriptedBackend, **options: float) -> tuple[Supervisor, list[tuple[str, str]]]:
    seen: list[tuple[str, str]] = []
    sup = Supervisor(
        backend,
        on_state=lambda state, why: seen.append((state, why)),
        check_interval=0.01,
        backoff=Backoff(initial=0.01),
        **options,
    )
    return sup.start(), seen


def wait_until(check, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_busy_backend_is_not_restarted() -> None:
    """Alive, port open, /health slow (a 24 MB prompt on its event loop): no restart."""
    backend = ScriptedBackend(["ok"] + ["busy"] * 40)
    sup, seen = run(backend, unhealthy_after=3, hung_after=60)
    try:
        wait_until(lambda: not backend.script or backend.launches > 1)
        time.sleep(0.1)
    finally:
        sup.stop(timeout=5)
    assert backend.launches == 1 and sup.restarts == 0, seen
    assert sup.recent_restarts == []
    ready = [why for state, why in seen if state == "ready"]
    assert ready[:3] == ["", "busy: /health is slow (process alive, port open)", ""], seen


@pytest.mark.parametrize("answer", ["unhealthy", "down"])
def test_a_dead_engine_or_a_closed_port_is_restarted(answer: str) -> None:
    backend = ScriptedBackend([answer] * 3)
    sup, _ = run(backend, unhealthy_after=3)
    try:
        wait_until(lambda: backend.launches == 2)
    finally:
        sup.stop(timeout=5)
    (restart,) = sup.recent_restarts
    assert restart["reason"] == f"unhealthy: 3 failed health checks in a row ({answer})"


def test_busy_for_longer_than_hung_after_is_restarted() -> None:
    backend = ScriptedBackend([], then="busy")
    sup, _ = run(backend, hung_after=0.3)
    try:
        wait_until(lambda: backend.launches == 2)
    finally:
        sup.stop(timeout=5)
    assert sup.recent_restarts[0]["reason"].startswith("hung: /health silent for ")


def test_restarts_are_logged_with_their_reason_and_the_last_few_kept(
    caplog: pytest.LogCaptureFixture,
) -> None:
    backend = ScriptedBackend([], exits=-9)

    def launch(timeout: float, progress=None, cancel=None) -> None:
        backend.launches += 1
        backend._running = True  # exits again every time

    backend.launch = launch  # type: ignore[method-assign]
    caplog.set_level(logging.WARNING, logger="inference.backends.supervisor")
    sup, _ = run(backend)
    try:
        wait_until(lambda: sup.restarts >= RESTART_HISTORY + 2)
    finally:
        sup.stop(timeout=5)
    kept = sup.recent_restarts
    assert len(kept) == RESTART_HISTORY
    numbers = [r["restart"] for r in kept]
    assert numbers == list(range(numbers[0], numbers[0] + RESTART_HISTORY)) and numbers[0] > 1
    assert {r["reason"] for r in kept} == {"exited with code -9"}
    assert all(abs(r["at"] - time.time()) < 60 for r in kept)
    assert "backend: restart #1: exited with code -9" in caplog.text


# -- ProcessBackend.probe against real sockets ----------------------------------------------------
def backend_at(port: int, tmp_path: Path) -> ProcessBackend:
    return ProcessBackend(
        ["true"], base_url=f"http://127.0.0.1:{port}", log_path=tmp_path / "b.log"
    )


@pytest.fixture
def http_server() -> Iterator[tuple[int, list[int]]]:
    """A real HTTP server whose /health status is the list's first item."""
    status = [200]

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(status[0])
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1], status
    server.shutdown()
    server.server_close()


def test_probe_ok_and_unhealthy(http_server: tuple[int, list[int]], tmp_path: Path) -> None:
    port, status = http_server
    backend = backend_at(port, tmp_path)
    assert backend.probe() == "ok"
    status[0] = 503
    assert backend.probe() == "unhealthy" and not backend.health()


def test_probe_busy_when_the_port_accepts_but_nothing_answers(tmp_path: Path) -> None:
    with socket.socket() as listener:  # the kernel accepts; nobody reads (a stalled loop)
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        backend = backend_at(listener.getsockname()[1], tmp_path)
        started = time.monotonic()
        assert backend.probe(timeout=0.3) == "busy"
        assert time.monotonic() - started < 2


def test_probe_down_when_nothing_listens(tmp_path: Path) -> None:
    assert backend_at(free_port(), tmp_path).probe(timeout=0.3) == "down"
