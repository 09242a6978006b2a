"""The approvals control API: JSON over a host-only unix socket, so the control plane (another
process; admin_client.py is its client) can list, approve and deny. Deliberately tiny:

    GET  /approvals                        → {"pending": [...]}
    POST /approvals/{id}/approve[?persist=1] → {"approved": {...}, "persisted": bool}
    POST /approvals/{id}/deny              → {"denied": {...}}
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from typing import Any
from urllib.parse import parse_qs, urlsplit

from sandbox.proxy.approvals import ApprovalBroker
from sandbox.proxy.forward import close_quietly
from sandbox.proxy.http1 import HttpError, read_head, serialize

_PHRASES = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Not Allowed", 500: "Error"}


def _response(status: int, payload: dict[str, Any]) -> bytes:
    body = json.dumps(payload).encode()
    headers = [
        ("Content-Type", "application/json"),
        ("Content-Length", str(len(body))),
        ("Connection", "close"),
    ]
    return serialize(("HTTP/1.1", str(status), _PHRASES.get(status, "Error")), headers) + body


class AdminServer:
    def __init__(
        self,
        broker: ApprovalBroker,
        socket_path: str | os.PathLike[str],
        listen_sock: socket.socket | None = None,  # bound (0600) and listening, by its owner
    ) -> None:
        self._broker = broker
        self.socket_path = os.fspath(socket_path)
        self._listen_sock = listen_sock
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        if self._listen_sock is not None:
            self._server = await asyncio.start_unix_server(self._handle, sock=self._listen_sock)
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)
        self._server = await asyncio.start_unix_server(self._handle, path=self.socket_path)
        os.chmod(self.socket_path, 0o600)  # the host user only: never reachable from a sandbox

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        if self._listen_sock is None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.socket_path)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await read_head(reader)
            if head is None:
                return
            status, payload = await self._route(head.first[0], head.first[1])
        except HttpError as exc:
            status, payload = exc.status, {"error": exc.reason}
        except Exception as exc:  # the API answers, whatever went wrong (e.g. the policy writer)
            status, payload = 500, {"error": f"{type(exc).__name__}: {exc}"}
        try:
            writer.write(_response(status, payload))
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            await close_quietly(writer)

    async def _route(self, method: str, target: str) -> tuple[int, dict[str, Any]]:
        url = urlsplit(target)
        parts = [p for p in url.path.split("/") if p]
        if parts == ["approvals"]:
            if method != "GET":
                return 405, {"error": "use GET"}
            return 200, {"pending": [p.to_json() for p in self._broker.list_pending()]}
        if len(parts) == 3 and parts[0] == "approvals" and parts[2] in ("approve", "deny"):
            if method != "POST":
                return 405, {"error": "use POST"}
            try:
                if parts[2] == "deny":
                    # the control plane's reason (an expiry), else the operator's denial
                    reason = parse_qs(url.query).get("reason", [""])[-1][:200].strip()
                    denied = self._broker.deny(parts[1], *([reason] if reason else []))
                    return 200, {"denied": denied.to_json()}
                persist = parse_qs(url.query).get("persist", ["0"])[-1] in ("1", "true", "yes")
                pending = await self._broker.approve(parts[1], persist=persist)
                return 200, {"approved": pending.to_json(), "persisted": persist}
            except KeyError as exc:
                return 404, {"error": str(exc.args[0])}
        return 404, {"error": f"no such resource {url.path}"}
