"""All-or-nothing creates: each step registers how to undo itself; a failure undoes them all.

`with Undo("sandbox web") as undo: ...; undo.add(fn, *args); ...; undo.commit()` — an exception
before `commit()` runs the registered undos newest first, then the exception goes on. An undo
that fails is logged and the rest still run: the caller's error is the one the operator sees.
"""

from __future__ import annotations

import contextlib
import logging
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sandbox.lifecycle.owned_paths import remove_owned

log = logging.getLogger(__name__)


class Undo(contextlib.ExitStack):
    def __init__(self, what: str = "") -> None:  # pop_all() makes one with no arguments
        super().__init__()
        self.what = what

    def add(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> None:
        self.callback(self._run, fn, args, kwargs)

    def _run(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        try:
            fn(*args, **kwargs)
        except Exception as exc:  # keep undoing: one leftover is better than all of them
            log.warning("undo %s: %s failed: %s", self.what, getattr(fn, "__name__", fn), exc)

    def commit(self) -> None:
        """Every step succeeded: keep what was made."""
        self.pop_all()


# -- the undo steps of a sandbox create ----------------------------------------------------------


def undo_new_dirs(undo: Undo, dirs: list[Path], shared: Path) -> None:
    """Register the removal of those of `dirs` that do not exist yet (a home kept by `rm
    --keep-home` does, and stays), each only inside its parent, and of `shared` if this call
    makes it and leaves it empty."""
    if not shared.exists():
        undo.add(_rmdir_if_empty, shared)
    for path in dirs:
        if not path.exists():
            undo.add(remove_owned, path.parent, path)


def _rmdir_if_empty(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.rmdir()


def end_proxy(proc: subprocess.Popen[bytes], pid_file: Path) -> None:
    """Stop an egress proxy this call started (even one that never said "ready")."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    pid_file.unlink(missing_ok=True)
