"""Who owns an open ledger row: a token naming the gateway process that reserved it, and whether
that owner may still settle it (else the next gateway start settles the row `interrupted`)."""

from __future__ import annotations

import functools
import os


@functools.cache  # fixed for the process's life; read once per open row otherwise
def _host() -> str:
    """`boot-id:pid-namespace-inode`: where a pid means something."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        return f"{boot}:{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return ""


def process_token(pid: int | None = None) -> str:
    """`boot-id:pid-ns:pid:start-time` of a process (Linux /proc) in this pid namespace: what
    owns open ledger rows. The start time tells a live owner from a later process that reuses
    its pid; the boot id and namespace say which pids the token's pid is one of."""
    pid = os.getpid() if pid is None else pid
    host = _host()
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return ""
    fields = stat[stat.rfind(b")") + 2 :].split()  # the command name may hold spaces
    return f"{host}:{pid}:{int(fields[19])}" if host else ""  # field 22 of stat: starttime


def owner_alive(token: str) -> bool:
    """Whether an open row's owner may still settle it (then the row is left alone).

    - Another boot: every process of it is gone, whatever its namespace: settle.
    - This boot, another pid namespace (a gateway in another container on the same store): its
      processes are out of sight and its pid numbers mean nothing here, so the row is left for
      that gateway to settle when it next starts (or for the first start after a reboot).
    - This boot and namespace: alive while that pid has that start time.
    - A legacy `pid:start` token (rows written before tokens named the boot): as before, a pid
      of this namespace."""
    parts = token.split(":")
    if len(parts) == 2:
        pid = parts[0]
        host = _host()
        return bool(pid.isdigit() and host and process_token(int(pid)) == f"{host}:{token}")
    if len(parts) != 4 or not parts[2].isdigit():
        return False
    boot, ns, pid, _start = parts
    here = _host().split(":")
    if len(here) != 2 or boot != here[0]:
        return False
    if ns != here[1]:
        return True
    return process_token(int(pid)) == token
