"""Serve the control plane's API on its unix socket and (optionally) a loopback port.

The socket is bound here, not by uvicorn, so its mode and group are set before anyone can
connect: 0660, group `appliance-admin` when that group exists. Each accepted unix connection's
peer credentials (SO_PEERCRED: pid, uid, gid) are read once, by the kernel's account, and handed
to the request as `request.scope["state"]["peer"]` (api/deps.py turns them into a Principal).
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import os
import socket
import struct
from pathlib import Path
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from appliance.control.api.deps import PeerCred

ADMIN_GROUP = "appliance-admin"
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def peer_credentials(sock: socket.socket) -> PeerCred | None:
    if sock.family != socket.AF_UNIX:
        return None
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return PeerCred(pid=pid, uid=uid, gid=gid)


class PeerCredProtocol(H11Protocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        peer = peer_credentials(sock) if sock is not None else None
        if peer is not None:  # a per-connection copy: requests copy app_state into their scope
            self.app_state = {**self.app_state, "peer": peer}


def bind_unix(path: Path) -> socket.socket:
    """The API socket, 0660 and group appliance-admin (if it exists), before listen()."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)  # a stale socket of a dead control plane (up holds the lock)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old = os.umask(0o177)
        try:
            sock.bind(str(path))
        finally:
            os.umask(old)
        with contextlib.suppress(KeyError):  # no such group: root (0600 in effect) only
            os.chown(path, 0 if os.geteuid() == 0 else -1, grp.getgrnam(ADMIN_GROUP).gr_gid)
        os.chmod(path, 0o660)
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    return sock


def bind_tcp(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    return sock


def serve(app: Any, sockets: list[socket.socket]) -> None:
    config = uvicorn.Config(
        app, http=PeerCredProtocol, lifespan="off", log_level="warning", access_log=False
    )
    uvicorn.Server(config).run(sockets=sockets)
