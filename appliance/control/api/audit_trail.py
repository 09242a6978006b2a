"""The API's audit trail: every request that may change something (POST, PUT, PATCH, DELETE) and
every refusal (401, 403) is appended to the host's hash-chained audit log as one
`control.request` record: who (Principal.audit_fields(): the socket peer's uid and pid, or the
operator's name), method, path and the status answered.

A pure ASGI middleware, so it sees the status the client gets. The record is written before the
response starts: a client that has its answer finds the record in the log. Never recorded: the
query string, headers (the token) and bodies (a key's secret).
"""

from __future__ import annotations

import functools
from typing import Any, Protocol

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from appliance.control.api.deps import PeerCred, Principal

EVENT = "control.request"
MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
REFUSED = frozenset({401, 403})
PATH_LIMIT = 512  # a path is a route and a name or two; a longer one is cut, not dropped


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
        return Principal("unix", f"uid:{peer.uid}", "admin", peer.uid, peer.pid).audit_fields()
    client = scope.get("client")
    fields: dict[str, Any] = {"actor": "anonymous", "actor_kind": "token"}
    if client:
        fields["client"] = f"{client[0]}:{client[1]}"
    return fields


class AuditTrail:
    def __init__(self, app: ASGIApp, sink: AuditSink) -> None:
        self.app = app
        self.sink = sink

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
                fields = {**who(scope), "method": method, "path": scope["path"][:PATH_LIMIT]}
                append = functools.partial(self.sink.audit, EVENT, **fields, status=status)
                await anyio.to_thread.run_sync(append)  # a lock and an fdatasync: off the loop

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
