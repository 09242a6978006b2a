"""The composition root: everything the control plane owns, built once per process.

Routers get the plane from `request.app.state.plane` (api/deps.py) and call its services; no
router opens a store or builds a manager itself. Services take the acting `Principal` so every
decision is audited with who took it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from appliance.config import ApplianceConfig
from appliance.store import Store, open_store


def socket_path(config: ApplianceConfig) -> Path:
    return config.state_dir / "run" / "control.sock"


class ControlPlane:
    def __init__(self, config: ApplianceConfig) -> None:
        self.config = config
        self.store: Store = open_store(config.state_dir)
        # One lock per named thing (sandbox, agent, approval): two clients acting on one name are
        # serialised here, so the second sees the first's result (and gets a 409), never a
        # half-made state. Different names proceed in parallel.
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    @contextmanager
    def locked(self, kind: str, name: str) -> Iterator[None]:
        key = f"{kind}:{name}"
        with self._locks_guard:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            yield

    def authenticate_operator(self, token: str) -> Any | None:
        """The live operator holding `token` (with .name and .role), or None."""
        return None  # operator tokens: not yet

    def close(self) -> None:
        self.store.close()

    def status(self) -> dict[str, Any]:
        """What `appliance status --json` prints (the read-only helper, fed by this process)."""
        from appliance.ops.status import gather

        return gather(self.config)
