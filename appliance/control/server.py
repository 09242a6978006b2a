"""Serve the control plane's API on its unix socket and (optionally) a loopback port.

One control plane per state dir: `serve control` holds an exclusive flock on
<state_dir>/run/control.lock for its lifetime (hold_lock), so a second one refuses instead of
taking over the socket (two reconcilers, two memories of approvals). Only the lock's holder
replaces a stale socket.

The socket is bound here, not by uvicorn, so its mode and group are set before anyone can
connect: 0660, group `appliance-admin` when that group exists, else 0600. Each accepted unix
connection's peer credentials (SO_PEERCRED: pid, uid, gid, and the peer's loginuid, which names
the user behind a sudo) are read once, by the kernel's account, and handed to the request as
`request.scope["state"]["peer"]` (api/deps.py turns them into a Principal).
"""

from __future__ import annotations

import asyncio
import fcntl
import grp
import os
import socket
import struct
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from appliance.control.api.deps import PeerCred
from appliance.errors import ConflictError

ADMIN_GROUP = "appliance-admin"
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
UNSET_LOGINUID = 4294967295  # (uid_t)-1: no login session (a daemon, or audit disabled)
GRACEFUL_STOP_S = 5  # open requests after a stop signal (see server())


def hold_lock(path: Path) -> int:
    """An exclusive flock on `path`, held until the returned descriptor is closed (at exit,
    even on kill -9); ConflictError when another control plane holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise ConflictError(
            f"another control plane (pid {holder}) holds {path}",
            hint="it is already running: `appliance status`; stop it (`appliance down`) first",
        ) from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def loginuid(pid: int) -> int | None:
    """The audit login uid of `pid` (who logged in, kept across sudo), when the kernel has one."""
    try:
        value = int(Path(f"/proc/{pid}/loginuid").read_text())
    except (OSError, ValueError):
        return None
    return None if value == UNSET_LOGINUID else value


def peer_credentials(sock: socket.socket) -> PeerCred | None:
    if sock.family != socket.AF_UNIX:
        return None
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return PeerCred(pid=pid, uid=uid, gid=gid, loginuid=loginuid(pid))


class PeerCredProtocol(H11Protocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        peer = peer_credentials(sock) if sock is not None else None
        if peer is not None:  # a per-connection copy: requests copy app_state into their scope
            self.app_state = {**self.app_state, "peer": peer}


def bind_unix(path: Path) -> socket.socket:
    """The API socket, before listen(): 0660 and group appliance-admin when that group exists
    (and this process may give the socket to it), else 0600: its owner only. The caller holds
    the lock (hold_lock), so a socket already there is a dead control plane's."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old = os.umask(0o177)
        try:
            sock.bind(str(path))  # 0600 from the start: nobody else connects before the chmod
        finally:
            os.umask(old)
        if _give_to_admin_group(path):
            os.chmod(path, 0o660)
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    return sock


def _give_to_admin_group(path: Path) -> bool:
    """chown the socket to root:appliance-admin (as root) or to the group only (a member may);
    False when there is no such group, or this user may not give it the socket."""
    try:
        gid = grp.getgrnam(ADMIN_GROUP).gr_gid
    except KeyError:
        return False
    try:
        os.chown(path, 0 if os.geteuid() == 0 else -1, gid)
    except PermissionError:  # a non-root user outside the group: the socket stays 0600
        return False
    return True


def bind_tcp(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named: asyncio sets TCP_NODELAY on accepted connections only for such sockets;
    # without it a response sent in two writes waited for the client's delayed ACK (~40 ms).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    return sock


class _Server(uvicorn.Server):
    """uvicorn's server, telling `on_exit` the moment a stop signal arrives (before its own
    graceful stop: the scheduler must start no turn meanwhile)."""

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None] | None) -> None:
        super().__init__(config)
        self.on_exit = on_exit

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.on_exit is not None:
            self.on_exit()
        super().handle_exit(sig, frame)


def server(app: Any, on_exit: Callable[[], None] | None = None) -> uvicorn.Server:
    """The API's server: each unix connection's peer credentials handed to its requests. A
    request still open GRACEFUL_STOP_S after a stop signal (a streamed turn) is cut off: the
    control plane has 30 s in all before SIGKILL, and parking the agents needs most of it."""
    config = uvicorn.Config(
        app,
        http=PeerCredProtocol,
        lifespan="off",
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=GRACEFUL_STOP_S,
    )
    return _Server(config, on_exit)
