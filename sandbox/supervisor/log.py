"""The supervisor's log lines (stderr, one prefix) and its exit codes."""

from __future__ import annotations

import contextlib
import os
import sys
from typing import NoReturn

PREFIX = "appliance-supervisor: "
EXIT_CONFIG, EXIT_LANDLOCK, EXIT_SPAWN = 2, 3, 4


def log(msg: str) -> None:
    sys.stderr.write(f"{PREFIX}{msg}\n")
    sys.stderr.flush()


def log_raw(msg: str) -> None:
    """For a forked child: one write(2) on fd 2, no lock. Another thread of the parent may have
    held sys.stderr's buffer lock at fork time, and in the child nobody would ever release it."""
    with contextlib.suppress(OSError):
        os.write(2, f"{PREFIX}{msg}\n".encode(errors="replace"))


def die(code: int, msg: str) -> NoReturn:
    log(msg)
    sys.exit(code)
