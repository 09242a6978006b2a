"""Which processes listen on a local TCP port (Linux /proc), so `up` can check that what answers
on the gateway's and the backend's ports is the supervisor's own child, not a stray server."""

from __future__ import annotations

import os
from pathlib import Path

_LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp's `st` column


def _listening_sockets(port: int) -> set[str] | None:
    """`socket:[inode]` of every listening socket on `port`; None without /proc/net."""
    found: set[str] = set()
    tables = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        tables += 1
        for row in rows:
            fields = row.split()
            listening = len(fields) > 9 and fields[3] == _LISTEN
            if listening and int(fields[1].rsplit(":", 1)[1], 16) == port:
                found.add(f"socket:[{fields[9]}]")
    return found if tables else None


def _group(pid: int) -> list[int]:
    """`pid` and the processes of its process group (vLLM forks workers into it)."""
    members = [pid]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != pid:
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[2]) == pid:
                members.append(int(entry.name))
    return members


def served_by(port: int, pid: int) -> bool | None:
    """Whether `port` is listened on by `pid` (or its process group): False when it is someone
    else's or nobody's; None when this host cannot tell (no /proc, or not our processes)."""
    sockets = _listening_sockets(port)
    if sockets is None:
        return None
    if not sockets:
        return False
    for member in _group(pid):
        fd_dir = f"/proc/{member}/fd"
        try:
            fds = os.listdir(fd_dir)
        except PermissionError:
            return None
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"{fd_dir}/{fd}") in sockets:
                    return True
            except OSError:
                continue
    return False
