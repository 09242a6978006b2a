"""A real local HTTP receiver for webhook tests: http.server on a thread, on 127.0.0.1, that
records every request (path, headers, body) and answers from a script of statuses."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    url: str
    # statuses to answer with, in order (then 200); an entry may be (status, {header: value})
    script: list[int | tuple[int, dict[str, str]]] = field(default_factory=list)
    requests: list[Received] = field(default_factory=list)
    delay_s: float = 0.0
    arrived: int = 0  # requests whose body was read (answered or still being delayed)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def wait_for(self, count: int, timeout: float = 10.0) -> list[Received]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.requests) >= count:
                    return list(self.requests)
            time.sleep(0.02)
        raise AssertionError(f"the receiver got {len(self.requests)} requests, not {count}")

    def wait_arrived(self, count: int, timeout: float = 10.0) -> None:
        """Until `count` requests have arrived, answered or not (a delayed one still hangs)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if self.arrived >= count:
                    return
            time.sleep(0.02)
        raise AssertionError(f"{self.arrived} requests arrived at the receiver, not {count}")


@contextmanager
def receiver(
    script: list[int | tuple[int, dict[str, str]]] | None = None, delay_s: float = 0.0
) -> Iterator[Receiver]:
    state = Receiver(url="", script=list(script or []), delay_s=delay_s)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            with state.lock:
                state.arrived += 1
            if state.delay_s:
                time.sleep(state.delay_s)
            with state.lock:
                state.requests.append(Received(self.path, dict(self.headers.items()), body))
                answer = state.script.pop(0) if state.script else 200
            status, headers = answer if isinstance(answer, tuple) else (answer, {})
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    state.url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
