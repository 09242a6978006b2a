"""The supervisor's run files: one supervisor per state dir, and one `up`/`down` at a time.

- `run/lifecycle.lock`: held (flock) by `appliance up` and `appliance down` for their whole run,
  so two of them never interleave: the second waits, then finds the appliance up (or down).
- `run/supervisor.lock`: held by the supervisor for its whole life. A second supervisor for the
  same state dir refuses to start, and a pid file whose lock nobody holds is stale.
- `run/supervisor.pid`: "<pid> <instance>", written atomically (temp file + rename) once that lock
  is held, and removed only by the process it names: a loser's clean-up cannot delete the winner's.
  `instance` is a nonce `up` hands its supervisor, so `up` knows that the state it reads (and the
  services answering on the ports) are its own supervisor's, not a stale or a foreign one's.
Lock files are never unlinked (that would let two processes each lock a different inode).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from appliance.errors import BackendError

LOCK_WAIT_S = 5.0  # the supervisor's retries while a reader probes its lock


class AlreadySupervised(BackendError):
    """Another supervisor holds this state dir."""

    hint = "`appliance down` stops it; `appliance status` shows what it serves"


def _open_lock(path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)


def _try_lock(fd: int, deadline: float) -> bool:
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.1)


def _holder(fd: int) -> str:
    """Who holds a lock, from the pid its holder wrote into it ("" when unknown: a holder that
    has just taken it has not written its pid yet)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        return f" (pid {int(os.pread(fd, 32, 0).split()[0])})"
    return ""


def _stamp(fd: int) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)


@contextlib.contextmanager
def lifecycle_lock(
    run_dir: Path, timeout: float, on_wait: Callable[[str], None] | None = None
) -> Iterator[None]:
    """Hold `run_dir/lifecycle.lock` for the block; wait up to `timeout` s for it."""
    fd = _open_lock(run_dir / "lifecycle.lock")
    try:
        if not _try_lock(fd, time.monotonic()):
            if on_wait is not None:
                on_wait(f"waiting for another `appliance up` or `down`{_holder(fd)}")
            if not _try_lock(fd, time.monotonic() + timeout):
                raise BackendError(
                    f"another `appliance up` or `down` is still running{_holder(fd)}",
                    hint="wait for it to finish, or raise --timeout",
                )
        _stamp(fd)
        yield
    finally:
        os.close(fd)  # releases the lock


def hold_supervisor_lock(run_dir: Path) -> int:
    """Take `run_dir/supervisor.lock` for this process's life; the fd (keep it open)."""
    fd = _open_lock(run_dir / "supervisor.lock")
    if not _try_lock(fd, time.monotonic() + LOCK_WAIT_S):
        holder = _holder(fd)
        os.close(fd)
        raise AlreadySupervised(f"another supervisor{holder} already runs for {run_dir.parent}")
    _stamp(fd)
    return fd


def supervisor_lock_held(run_dir: Path) -> bool | None:
    """Whether a live process holds the supervisor lock; None if it cannot be checked here."""
    try:
        fd = os.open(run_dir / "supervisor.lock", os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    except OSError:  # e.g. another user's state dir: fall back to the pid alone
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return None
    finally:
        os.close(fd)  # also drops the shared lock just taken
    return False


def write_atomically(path: Path, text: str) -> None:
    """Readers see the old content or the new one, never a part (temp file + rename)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write_pid_file(path: Path, instance: str) -> None:
    write_atomically(path, f"{os.getpid()} {instance}\n")


def read_pid_file(path: Path) -> tuple[int, str] | None:
    """(pid, instance) as written, or None when absent or unreadable."""
    try:
        fields = path.read_text().split()
        return int(fields[0]), (fields[1] if len(fields) > 1 else "")
    except (OSError, ValueError, IndexError):
        return None


def remove_if_mine(pid_file: Path, services_file: Path) -> None:
    """The clean-up of a supervisor that stops: its own pid file and state, nobody else's."""
    mine = os.getpid()
    if (read_pid_file(pid_file) or (None,))[0] == mine:
        pid_file.unlink(missing_ok=True)
    with contextlib.suppress(OSError, ValueError):
        data: Any = json.loads(services_file.read_text())
        if isinstance(data, dict) and data.get("supervisor_pid") == mine:
            services_file.unlink(missing_ok=True)
