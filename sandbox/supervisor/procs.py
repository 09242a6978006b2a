"""PID 1's children: reaping every exited one, finding and stopping those that remain."""

from __future__ import annotations

import contextlib
import os
import signal
import time

from log import log


def reap(agent_pid: int) -> int | None:
    """Collect every exited child; return the agent's wait status if it was among them."""
    agent_status = None
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return agent_status
        if pid == 0:
            return agent_status
        if pid == agent_pid:
            agent_status = status


def children() -> list[int]:
    me, found = os.getpid(), []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # The comm field may hold spaces and parens: ppid is the 2nd field after the last ')'.
        if int(stat[stat.rindex(b")") + 2 :].split()[1]) == me:
            found.append(int(entry))
    return found


def stop_the_rest(grace: float) -> None:
    """After the agent: SIGTERM every remaining child, SIGKILL after `grace`, reap them all."""
    deadline, sig = time.monotonic() + grace, signal.SIGTERM
    while kids := children():
        if time.monotonic() > deadline:
            sig = signal.SIGKILL
        for pid in kids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        signal.sigtimedwait({signal.SIGCHLD}, 0.05)
        reap(-1)
        if time.monotonic() > deadline + 2:
            log(f"children left after SIGKILL: {kids}")
            return


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a member we may not signal: nothing more we can do
        return False
    return True


def stop_group(leader: int, sig: int, grace: float) -> int | None:
    """`sig` to the process group `leader` leads, SIGKILL after `grace`, until the group is gone;
    the leader's wait status if it was reaped here. Called before a new start, never after it:
    the group's id cannot be reused while any member lives, and our next leader gets a new pid."""
    status = reap(leader)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(leader, sig)
    deadline = time.monotonic() + grace
    killed = False
    while _group_alive(leader):
        if not killed and time.monotonic() > deadline:
            log("runtime ignored the stop signal: SIGKILL to its process group")
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(leader, signal.SIGKILL)
            killed = True
        elif killed and time.monotonic() > deadline + 2:
            log(f"runtime group {leader} still alive after SIGKILL")
            break
        signal.sigtimedwait({signal.SIGCHLD}, 0.05)
        got = reap(leader)  # zombies count as members until reaped
        status = status if got is None else got
    return status
