"""A turn while it runs (turns.py): what it has come to so far, and how it is cut off.

`AgentSocketTransport` is the HTTP transport to an agent's runtime over its agent socket. The
socket lives in a directory the agent owns, and the control plane is root: each connection opens
the path with O_PATH|O_NOFOLLOW, checks that what it got is a socket (not a symlink the agent put
there, pointing at some other socket of the host) and connects through /proc/self/fd/N, so what
was checked is what is reached (AgentSocketRefused otherwise: the turn fails, saying why). Its
`interrupt()` (from any thread) shuts down every connection it made, so a drive blocked on a
runtime that is silent (a long prefill on a CPU, a runtime not ready yet) returns at once, and
refuses any request after it with TurnInterrupted, which drive() lets through (no retry, no
wait for readiness); closing the drive then cancels the turn in the runtime. `TurnEvents` is a
turn's events with that `interrupt()`: the API calls it the moment the client disconnects, then
closes the events.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import threading
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpcore
import httpx

from blueprints.runtimes import Finished, Reply, TurnStopped

STDERR_TAIL = 2000  # characters of an exec turn's stderr kept for the error line
KEEPALIVE_S = 5.0  # as httpx's default pool
CLIENT_GONE = "the client went away"


class TurnInterrupted(TurnStopped):
    """The turn's client went away: its transport makes no more requests."""


class AgentSocketRefused(TurnStopped):
    """The agent socket's path is not a socket (the agent may have replaced it)."""


class AgentSocketTransport(httpx.HTTPTransport):
    def __init__(self, path: Path) -> None:
        super().__init__(uds=str(path))
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self.interrupted = False
        self.reason = CLIENT_GONE  # why it was interrupted (the first interrupt's)
        # httpx takes no network backend: its pool is made again, with ours (same uds).
        self._pool = httpcore.ConnectionPool(
            uds=str(path), keepalive_expiry=KEEPALIVE_S, network_backend=_CheckedUnix(self)
        )

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if self.interrupted:
            raise TurnInterrupted(f"the turn was interrupted: {self.reason}")
        try:
            return super().handle_request(request)
        except httpx.TransportError as exc:
            if self.interrupted:  # cut by interrupt() while it waited for the answer
                raise TurnInterrupted(f"the turn was interrupted: {self.reason}") from exc
            raise

    def connected(self, sock: socket.socket) -> None:
        """A new connection (the network backend's): kept to be shut by interrupt()."""
        with self._lock:
            self._sockets.append(sock)
            interrupted = self.interrupted
        if interrupted:  # interrupt() ran while it connected
            _shut(sock)

    def interrupt(self, reason: str = CLIENT_GONE) -> None:
        with self._lock:
            if not self.interrupted:
                self.reason = reason
            self.interrupted = True
            sockets = list(self._sockets)
        for sock in sockets:
            _shut(sock)


class _CheckedUnix(httpcore.SyncBackend):
    """Connects to the agent socket only if it is a socket (see the module)."""

    def __init__(self, transport: AgentSocketTransport) -> None:
        self.transport = transport

    def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        try:  # the last component only: the directories above it are root's
            fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:  # not there (yet): as a refused connection, retried
            raise httpcore.ConnectError(f"{path}: {exc.strerror}") from exc
        try:
            mode = os.fstat(fd).st_mode
            if not stat.S_ISSOCK(mode):
                what = "a symlink" if stat.S_ISLNK(mode) else "not a socket"
                raise AgentSocketRefused(
                    f"{path} is {what}, not the agent socket its supervisor binds: the turn "
                    "is refused (was it replaced from inside the sandbox?)"
                )
            stream = super().connect_unix_socket(f"/proc/self/fd/{fd}", timeout, socket_options)
        finally:
            os.close(fd)
        sock = stream.get_extra_info("socket")
        if sock is not None:
            self.transport.connected(sock)
        return stream


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

    def cancel(self, reason: str = CLIENT_GONE) -> None:
        self.cancelled, self.ok, self.error = True, False, f"cancelled: {reason}"

    @property
    def reply(self) -> str:
        """The runtime's final text; what was streamed when it gave none (a failure) or the
        turn was cut off (cancelled): what the client saw."""
        return self.text if self.text and not self.cancelled else "".join(self.parts)
