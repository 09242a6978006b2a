"""Deletes and writes that stay inside the directory a command owns.

Every destructive path (sandbox and agent rm, upgrade and rollback, a failed create's undo,
bundle install) goes through `owned_child`: the target must be a strict child of the directory
it belongs to, with `..` and symlinks in its parents resolved. The nameless sandbox (whose
directory would be the shared `sandboxes/` itself) and `../x` are refused here even if a name
slipped past the name rule (a record made by an older version).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from sandbox.lifecycle.errors import SandboxError


class UnsafePathError(SandboxError):
    """A path to delete or write is not strictly inside the directory that owns it."""

    hint = (
        "nothing was changed; a record whose name breaks the name rule (made by an older "
        "version) must be removed by hand"
    )


def owned_child(parent: Path, child: Path) -> Path:
    """`child`, if it lies strictly inside `parent`. Its parents are resolved (symlinks, `..`);
    its last component is not followed, so a symlink child is itself the child."""
    raw = os.fspath(child)
    name = os.path.basename(raw.rstrip("/")) if raw.rstrip("/") else ""
    if raw.endswith("/") or name in ("", ".", ".."):
        raise UnsafePathError(f"refusing {raw!r}: not strictly inside {parent}")
    base = Path(parent).resolve()
    where = Path(os.path.dirname(raw) or ".").resolve() / name
    if where == base or base not in where.parents:
        raise UnsafePathError(f"refusing {raw!r}: not strictly inside {parent}")
    return child


def remove_owned(parent: Path, child: Path) -> None:
    """Delete `child` (a tree, a file or a link; missing is fine) after `owned_child`."""
    owned_child(parent, child)
    if child.is_symlink() or child.is_file():
        child.unlink(missing_ok=True)
    elif child.exists():
        shutil.rmtree(child, onerror=_gone_is_fine)


def _gone_is_fine(_func: object, _path: str, exc_info: tuple) -> None:
    # An entry a process winding down removed itself meanwhile (the egress proxy's admin socket
    # as `sandbox rm` stops it): gone is what was asked.
    if not issubclass(exc_info[0], FileNotFoundError):
        raise exc_info[1]
