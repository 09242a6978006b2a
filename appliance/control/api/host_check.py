"""Refuse a request on the TCP port whose Host header is not this host's loopback name.

A web page the operator's browser opens can make its own name resolve to 127.0.0.1 (DNS
rebinding) and then talk to the port as a "same-origin" site. The browser still sends the page's
name as Host; a loopback listener has no business answering any name but its own. Answered with
421 (Misdirected Request) in the one error shape, before auth and the audit trail (a browser's
probes are not operators' requests). The unix socket is not checked: Host means nothing there.
"""

from __future__ import annotations

from collections.abc import Iterable

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from appliance.config import is_loopback
from appliance.control.api.deps import PeerCred
from appliance.control.api.errors import error_body


def host_name(header: str) -> str:
    """The name in a Host header, without its port (`[::1]:8070` -> `::1`), lower case."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    name, _, port = header.rpartition(":")
    return name if name and port.isdigit() and ":" not in name else header


class LoopbackHostOnly:
    def __init__(self, app: ASGIApp, also: Iterable[str] = ()) -> None:
        """`also`: names the operator bound the port to on purpose (control.host)."""
        self.app = app
        self.also = frozenset(h.lower() for h in also)

    def allowed(self, name: str) -> bool:
        return is_loopback(name.removesuffix(".")) or name in self.also

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not isinstance(
            (scope.get("state") or {}).get("peer"), PeerCred
        ):
            raw = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
            if not self.allowed(host_name(raw)):
                body = error_body(
                    f"Host {raw[:100]!r} is not this host's loopback name",
                    "invalid_request",
                    hint="call the port as http://127.0.0.1:<control.port>/ (or localhost)",
                )
                await JSONResponse(body, 421)(scope, receive, send)
                return
        await self.app(scope, receive, send)
