"""The API's audit trail: every request that may change something (POST, PUT, PATCH, DELETE) and
every refusal (401, 403) is appended to the host's hash-chained audit log as one
`control.request` record: who (Principal.audit_fields(): the socket peer's uid and pid, or the
operator's name), method, path and the status answered.

A pure ASGI middleware, so it sees the status the client gets. The record is written before the
response starts: a client that has its answer finds the record in the log. Never recorded: the
query string, headers (the token) and bodies (a key's secret).

Anonymous refusals (no token, or one nobody holds) are anyone's to make, as fast as they like:
each a record, fdatasync'd, would let them flood the log. They are counted per client address
instead (RefusalCounter): the first is recorded at once, the rest within REFUSAL_WINDOW_S in one
record when the window closes, with `refusals: N`, the number it stands for. A refusal of a known
operator (403) stays one record each.
"""

from __future__ import annotations

import asyncio
import functools
from dataclasses import dataclass, field
from typing import Any, Protocol

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from appliance.control.api import lanes
from appliance.control.api.deps import PeerCred, Principal

EVENT = "control.request"
MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
REFUSED = frozenset({401, 403})
PATH_LIMIT = 512  # a path is a route and a name or two; a longer one is cut, not dropped
REFUSAL_WINDOW_S = 10.0  # at most one record of anonymous refusals per address per window
OPEN_WINDOWS_LIMIT = 1024  # beyond: one window for every other address (127/8 is 16M of them)
# A one-tap link's token is in its path and is its only credential: never recorded. Its page
# takes no login, so a refused anonymous POST there is counted like a 401 (no flood).
TOKEN_PATHS = ("/one-tap/",)


def shown_path(path: str) -> str:
    for prefix in TOKEN_PATHS:
        if path.startswith(prefix):
            return prefix + "<token>"
    return path[:PATH_LIMIT]


class AuditSink(Protocol):
    def audit(self, event: str, **fields: Any) -> None: ...


def who(scope: Scope) -> dict[str, Any]:
    """The caller as the auth dependency saw it; for a refused or unrouted request, what the
    connection tells (the socket peer, or the TCP client's address: never its token)."""
    state = scope.get("state") or {}
    principal = state.get("principal")
    if isinstance(principal, Principal):
        return principal.audit_fields()
    peer = state.get("peer")
    if isinstance(peer, PeerCred):
        return peer.principal().audit_fields()
    client = scope.get("client")
    fields: dict[str, Any] = {"actor": "anonymous", "actor_kind": "token"}
    if client:
        fields["client"] = f"{client[0]}:{client[1]}"
    return fields


@dataclass
class _Window:
    count: int = 0  # refusals since the window's record
    last: dict[str, Any] = field(default_factory=dict)  # the latest one's method, path, status


class RefusalCounter:
    """Open windows of anonymous refusals, by client address (not port: a new connection each
    time is free). Event-loop only: no lock."""

    def __init__(self, window_s: float = REFUSAL_WINDOW_S) -> None:
        self.window_s = window_s
        self.open: dict[str, _Window] = {}

    def key(self, address: str) -> str:
        full = len(self.open) >= OPEN_WINDOWS_LIMIT and address not in self.open
        return "*" if full else address

    def opens(self, key: str) -> bool:
        """Whether this refusal opens a window (and is recorded now); else it is counted."""
        return key not in self.open

    def take(self, key: str) -> _Window:
        return self.open.pop(key)


class AuditTrail:
    def __init__(self, app: ASGIApp, sink: AuditSink, window_s: float = REFUSAL_WINDOW_S) -> None:
        self.app = app
        self.sink = sink
        self.refusals = RefusalCounter(window_s)
        self._closing: set[asyncio.Future[None]] = set()

    async def write(self, fields: dict[str, Any]) -> None:
        append = functools.partial(self.sink.audit, EVENT, **fields)
        # A lock and an fdatasync: off the loop, and on a lane of its own (api/lanes.py): never
        # behind the shared pool's slow sync routes (a kill's record is written before its 200).
        await lanes.AUDIT.run(append)

    async def refused_anonymously(self, fields: dict[str, Any]) -> None:
        """Record this refusal now if it opens its address's window, else count it for the
        record that closes the window."""
        key = self.refusals.key(str(fields.get("client", "?")).rsplit(":", 1)[0])
        if not self.refusals.opens(key):
            window = self.refusals.open[key]
            window.count += 1
            window.last = fields
            return
        self.open_window(key)
        await self.write({**fields, "refusals": 1})

    def open_window(self, key: str) -> None:
        self.refusals.open[key] = _Window()

        def close() -> None:
            task = asyncio.ensure_future(self.close_window(key))
            self._closing.add(task)  # the loop keeps only a weak reference to a task
            task.add_done_callback(self._closing.discard)

        asyncio.get_running_loop().call_later(self.refusals.window_s, close)

    async def close_window(self, key: str) -> None:
        """The window's count in one record; with any, a new window opens (still at most one
        record per window), else the address is forgotten."""
        window = self.refusals.take(key)
        if window.count:
            self.open_window(key)
            client = window.last.get("client") if key != "*" else "*"
            await self.write({**window.last, "client": client, "refusals": window.count})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method = scope["method"]
        recorded = False

        async def record(status: int) -> None:
            nonlocal recorded
            recorded = True
            if method in MUTATING or status in REFUSED:
                fields = {**who(scope), "method": method, "path": shown_path(scope["path"])}
                fields["status"] = status
                refused = status in REFUSED or (
                    status >= 300 and scope["path"].startswith(TOKEN_PATHS)
                )
                if refused and fields["actor"] == "anonymous":
                    await self.refused_anonymously(fields)
                else:
                    await self.write(fields)

        async def send_recorded(message: Message) -> None:
            if message["type"] == "http.response.start" and not recorded:
                await record(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_recorded)
        except BaseException:
            # The 500 is sent by the server's error middleware, outside this one: record it here.
            if not recorded:
                await record(500)
            raise
