"""The unprivileged proxy's one link to its privileged monitor (privilege separation).

The proxy parses the sandbox's HTTP, so it runs as an unprivileged user with no capabilities
and opens no file: the monitor (sandbox/proxy/monitor.py, root) binds its sockets and hands it
the descriptors, and this link, a unix socket pair, carries everything else as JSON lines:

    monitor → proxy   {"hello": {"policy": YAML, "source": path, "key": str|null}}   first
                      {"policy": YAML}                                 on SIGHUP (reload)
                      {"reply": id, "error": str|null}                 to a persist request
    proxy → monitor   {"audit": event, "fields": {...}}                a decision to record
                      {"persist": id, "endpoint": {...}}               write a persisted approval

So the proxy never reads the key file, the store, the policy file or the audit chain: the
monitor appends its records to the chain (forcing `sandbox` to the one it serves), and writes
the policy file for a persisted approval.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the monitor imports this module and must stay light (no pydantic)
    from sandbox.policy import Endpoint

MAX_LINE = 1024 * 1024  # a policy is a few KiB; an audit record less
PR_SET_DUMPABLE = 4


def not_dumpable() -> None:
    """No core dumps, and no ptrace or /proc/PID/mem from other processes of the same uid
    (other sandboxes' proxies run as the same user and must not read this one's key)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE, 0)")


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, default=str, separators=(",", ":")).encode() + b"\n"


class MonitorLink:
    """The proxy's end: an AuditSink and a PolicyWriter, and the source of policy reloads."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._replies: dict[int, asyncio.Future[str | None]] = {}
        self._next = 0
        self._task: asyncio.Task[None] | None = None
        self.closed = asyncio.Event()

    @classmethod
    async def open(cls, fd: int) -> tuple[MonitorLink, dict[str, Any]]:
        """Connect on the inherited descriptor and wait for the monitor's hello."""
        sock = socket.socket(fileno=fd)
        reader, writer = await asyncio.open_unix_connection(sock=sock, limit=MAX_LINE)
        link = cls(reader, writer)
        line = await reader.readline()
        hello = json.loads(line or b"null")
        if not isinstance(hello, dict) or not isinstance(hello.get("hello"), dict):
            raise SystemExit("privsep: the monitor sent no hello")
        return link, hello["hello"]

    def start(self, on_policy: Callable[[str], None]) -> None:
        self._task = asyncio.create_task(self._read(on_policy))

    async def _read(self, on_policy: Callable[[str], None]) -> None:
        try:
            while line := await self._reader.readline():
                message = json.loads(line)
                if "policy" in message:
                    on_policy(str(message["policy"]))
                elif "reply" in message:
                    future = self._replies.pop(int(message["reply"]), None)
                    if future is not None and not future.done():
                        future.set_result(message.get("error"))
        except (ConnectionError, ValueError, asyncio.LimitOverrunError):
            pass
        finally:
            for future in self._replies.values():
                if not future.done():
                    future.set_result("the monitor went away")
            self.closed.set()  # without its monitor the proxy cannot audit: it stops

    # AuditSink
    def audit(self, event: str, **fields: Any) -> None:
        if not self._writer.is_closing():
            self._writer.write(encode({"audit": event, "fields": fields}))

    # PolicyWriter
    async def persist_allow(self, sandbox: str, endpoint: Endpoint) -> None:
        self._next += 1
        future: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self._replies[self._next] = future
        self._writer.write(encode({"persist": self._next, "endpoint": endpoint.model_dump()}))
        error = await future
        if error is not None:
            raise RuntimeError(f"the monitor could not persist the approval: {error}")

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._writer.drain()
        self._writer.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
