"""A turn while it runs (turns.py): what it has come to so far, and how it is cut off.

`AgentSocketTransport` is the HTTP transport to an agent's runtime over its agent socket, with
`interrupt()`: it shuts down the connections of the responses it gave out, from any thread, so a
drive blocked reading a runtime that is silent (a long prefill on a CPU) returns at once; closing
the drive then cancels the turn in the runtime. `TurnEvents` is a turn's events with that
`interrupt()`: the API calls it the moment the client disconnects, then closes the events.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from blueprints.runtimes import Finished, Reply

STDERR_TAIL = 2000  # characters of an exec turn's stderr kept for the error line


class AgentSocketTransport(httpx.BaseTransport):
    def __init__(self, path: Path) -> None:
        self._inner = httpx.HTTPTransport(uds=str(path))
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self.interrupted = False

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self._inner.handle_request(request)
        stream = response.extensions.get("network_stream")  # httpcore's, per response
        sock = stream.get_extra_info("socket") if stream is not None else None
        if sock is not None:
            with self._lock:
                self._sockets.append(sock)
                interrupted = self.interrupted
            if interrupted:  # the client went away while this request was being answered
                _shut(sock)
        return response

    def interrupt(self) -> None:
        with self._lock:
            self.interrupted = True
            sockets = list(self._sockets)
        for sock in sockets:
            _shut(sock)

    def close(self) -> None:
        self._inner.close()


def _shut(sock: socket.socket) -> None:
    """Wake a thread blocked reading it (close alone would not), and tell the runtime."""
    with contextlib.suppress(OSError):  # closed already
        sock.shutdown(socket.SHUT_RDWR)


class TurnEvents(Iterator[dict[str, Any]]):
    """A turn's events (a generator: `close` records it as cancelled) and `interrupt`.
    `unstarted` runs when it is closed before its first event was asked for (a generator
    closed then runs none of its code: the turn would go unrecorded)."""

    def __init__(
        self,
        events: Generator[dict[str, Any], None, None],
        interrupt: Callable[[], None] | None = None,
        unstarted: Callable[[], None] | None = None,
    ) -> None:
        self._events = events
        self._interrupt = interrupt
        self._unstarted = unstarted
        self._started = False

    def __next__(self) -> dict[str, Any]:
        self._started = True
        return next(self._events)

    def close(self) -> None:
        if not self._started and self._unstarted is not None:
            self._started = True  # once
            self._unstarted()
        self._events.close()

    def interrupt(self) -> None:
        """Thread-safe: stop waiting for the runtime (a drive over the agent socket)."""
        if self._interrupt is not None:
            self._interrupt()


@dataclass
class Outcome:
    """What the turn came to, filled in as its events arrive."""

    parts: list[str] = field(default_factory=list)
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    finished: bool = False
    ok: bool = False
    text: str | None = None
    exit_code: int | None = None
    usage: dict[str, Any] = field(default_factory=dict)
    session_id: str | None = None
    raw: dict[str, Any] | None = None
    error: str | None = None
    cancelled: bool = False
    stderr_tail: str = ""

    def finish(self, event: Finished) -> None:
        self.finished, self.ok, self.text = True, event.ok, event.text
        self.usage, self.session_id, self.raw = dict(event.usage), event.session_id, event.raw
        self.error = None if event.ok else (event.error or "the runtime reported a failure")

    def replied(self, reply: Reply, code: int, stderr: bytes) -> None:
        self.finished, self.ok, self.text, self.exit_code = True, reply.ok, reply.text, code
        self.usage, self.session_id, self.raw = dict(reply.usage), reply.session_id, reply.raw
        self.stderr_tail = stderr.decode(errors="replace")[-STDERR_TAIL:]
        if not reply.ok:
            last = self.stderr_tail.strip().splitlines()[-1:]
            self.error = str((reply.raw or {}).get("error") or (last[0] if last else "no output"))

    def fail(self, exc: BaseException) -> None:
        self.ok, self.error = False, f"{type(exc).__name__}: {exc}"

    def cancel(self) -> None:
        self.cancelled, self.ok, self.error = True, False, "cancelled: the client went away"

    @property
    def reply(self) -> str:
        """The runtime's final text; what was streamed when it gave none (a failure) or the
        turn was cut off (cancelled): what the client saw."""
        return self.text if self.text and not self.cancelled else "".join(self.parts)
