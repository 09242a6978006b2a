"""PID 1's byte forwarders, one thread per direction per connection:
- egress: the agent's 127.0.0.1:3128 (TCP) → the egress proxy's unix socket;
- agent socket: the host's unix socket (in a mounted host directory) → the runtime's loopback
  port. The runtime may not be listening (starting, restarting, stopped): the host's connection
  is then closed cleanly, and the host tells that from the report's `runtime` state.

Both listeners are bound before PID 1 restricts itself with Landlock (binding is a Landlock right).

Who may use the agent socket: connecting to a unix socket is not a Landlock-controlled action, and
the agent (same uid) can reach the socket's path inside the sandbox. The runtime behind it holds
the keys of the agent's own turns, so a connection from inside would drive the runtime around the
control plane's gate and transcript. `outside_only` admits a peer only when SO_PEERCRED's pid is 0:
the kernel gives 0 for a peer outside the reader's pid namespace (the host's control plane) and the
peer's pid for every process of the sandbox, `podman exec` ones included. The peer's credentials
are the kernel's, taken at connect(): nobody can forge them.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable

from log import log

Connect = Callable[[], socket.socket]
Admit = Callable[[socket.socket], str | None]  # why a connection is refused, or None
DRAIN_S = 2.0  # how long a refused client gets to close its side before we close ours
REFUSED_LOG_S = 10.0  # at most one "refused" line per this long (a hostile loop floods nothing)


def bind_tcp_listener(listen: str) -> socket.socket:
    host, _, port = listen.rpartition(":")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, int(port)))
    sock.listen(256)
    return sock


def bind_unix_listener(path: str) -> socket.socket:
    """Bind `path` 0600 (owner only: the agent uid, which the host maps to its own). A socket
    left by an earlier run of this sandbox is replaced; any other kind of file is an error."""
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # never reachable by others, not even between bind and chmod
    try:
        sock.bind(path)
    except OSError:
        sock.close()
        raise
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(64)
    return sock


def unix_upstream(path: str) -> Connect:
    def connect() -> socket.socket:
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            upstream.connect(path)
        except OSError:
            upstream.close()
            raise
        return upstream

    return connect


def tcp_upstream(port: int) -> Connect:
    return lambda: socket.create_connection(("127.0.0.1", port), timeout=5)


def peer_pid(conn: socket.socket) -> int:
    """The connecting process's pid as PID 1's pid namespace sees it (0: outside it)."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[0]


def outside_only(conn: socket.socket) -> str | None:
    """Admit only a peer outside the sandbox's pid namespace (see the module docstring)."""
    try:
        pid = peer_pid(conn)
    except OSError as exc:
        return f"peer credentials unreadable ({exc})"
    return None if pid == 0 else f"pid {pid} is inside the sandbox"


def _pump(src: socket.socket, dst: socket.socket) -> None:
    """Copy until EOF, then half-close dst so the peer sees EOF but can still answer."""
    try:
        while data := src.recv(65536):
            dst.sendall(data)
        dst.shutdown(socket.SHUT_WR)
    except OSError:  # a reset on either side ends both directions
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)


def _refuse(client: socket.socket) -> None:
    """Close without a reset: EOF first, then read what the client sent until it closes too
    (closing a unix socket with unread data makes the peer's next read fail ECONNRESET)."""
    with contextlib.suppress(OSError):
        client.shutdown(socket.SHUT_WR)
        client.settimeout(DRAIN_S)
        while client.recv(65536):
            pass
    client.close()


class Forwarder:
    """Accepts on `listener` and pipes each connection to a fresh `connect()` (`target` names
    it in log lines: at most one "cannot reach" line per `quiet_s`). With `admit`, a connection
    it refuses is closed at once, unanswered, and counted in `refused` (one accept thread
    writes it; the main thread reads it for the report)."""

    def __init__(
        self,
        name: str,
        listener: socket.socket,
        connect: Connect,
        target: str,
        quiet_s: float,
        admit: Admit | None = None,
    ) -> None:
        self.name, self.listener, self.connect, self.target = name, listener, connect, target
        self.quiet_s, self.admit = quiet_s, admit
        self.refused = 0
        self._quiet_until = 0.0  # a benign race between threads: at worst one line more
        self._refused_quiet_until = 0.0

    def start(self) -> None:
        threading.Thread(target=self._serve, name=self.name, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError as exc:
                log(f"{self.name}: accept failed: {exc}")
                time.sleep(0.05)
                continue
            if self.admit is not None and (why := self.admit(conn)) is not None:
                conn.close()
                self._note_refusal(why)
                continue
            threading.Thread(target=self._bridge, args=(conn,), daemon=True).start()

    def _note_refusal(self, why: str) -> None:
        self.refused += 1
        if time.monotonic() >= self._refused_quiet_until:
            self._refused_quiet_until = time.monotonic() + REFUSED_LOG_S
            log(f"{self.name}: connection refused: {why} (refused so far: {self.refused})")

    def _bridge(self, client: socket.socket) -> None:
        try:
            upstream = self.connect()
        except OSError as exc:
            if time.monotonic() >= self._quiet_until:
                self._quiet_until = time.monotonic() + self.quiet_s
                log(f"{self.name}: cannot reach {self.target}: {exc}")
            _refuse(client)
            return
        upstream.settimeout(None)
        for s in (client, upstream):  # no Nagle delay on replies
            if s.family == socket.AF_INET:
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        back = threading.Thread(target=_pump, args=(upstream, client), daemon=True)
        back.start()
        _pump(client, upstream)
        back.join()
        client.close()
        upstream.close()
