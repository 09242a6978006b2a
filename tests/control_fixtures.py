"""A real control plane (`appliance serve control`, a subprocess) for tests whose CLI commands
change state: since issue 12 those go through its API, so a test that runs them starts one on
its state dir first. The `control_plane` fixture (tests/conftest.py) does it for the test's own
isolated environment; `running_control_plane` for an environment a test builds itself."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from appliance.control.plane import ControlPlane

APPLIANCE = str(Path(sys.executable).parent / "appliance")
START_TIMEOUT_S = 30.0


@contextlib.contextmanager
def serving(plane: ControlPlane, listeners: list[socket.socket]) -> Iterator[None]:
    """The control plane's own server (server.py: peer credentials, h11) over `plane`, in this
    process, on `listeners` (closed after) until the block ends: for tests that replace a
    service of the plane and still want the real transport."""
    from appliance.control.api import create_app
    from appliance.control.server import server

    api = server(create_app(plane))
    thread = threading.Thread(target=api.run, kwargs={"sockets": listeners}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    try:
        while not api.started:
            assert time.monotonic() < deadline and thread.is_alive(), "the server never started"
            time.sleep(0.02)
        yield
    finally:
        api.should_exit = True
        thread.join(15)
        for listener in listeners:
            listener.close()


def control_socket(state_dir: Path) -> Path:
    return state_dir / "run" / "control.sock"


def _answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(path))
            s.sendall(b"GET /api/v1/openapi.json HTTP/1.0\r\n\r\n")  # a peer: always admin
            return s.recv(12).startswith(b"HTTP/1.1 200")
        except OSError:  # not listening yet, or reset by a control plane still starting
            return False


@contextlib.contextmanager
def running_control_plane(
    env: dict[str, str], state_dir: Path, prefix: list[str] | None = None
) -> Iterator[subprocess.Popen]:
    """`appliance serve control` with `env`, ready (its socket answers) until the block ends;
    `prefix` runs it behind e.g. nsenter (the proxies it starts resolve and connect there)."""
    log = state_dir.parent / f"control-{os.getpid()}-{time.monotonic_ns()}.log"
    state_dir.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*(prefix or []), APPLIANCE, "serve", "control"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _answers(control_socket(state_dir)):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"control plane did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.05)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
