"""What the lifecycle needs from the host, declared here so `sandbox` never imports `appliance`.

The control plane implements them (appliance/control/wiring.py): the records are its SQLite store
(appliance/store/sandbox_store.py), the keys its inference store, the audit sink its hash-chained
log; the settings come from its config.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from sandbox.policy import Network, Policy
from sandbox.proxy.options import DEFAULT_MAX_PENDING
from sandbox.proxy.ports import AuditSink

__all__ = [
    "AuditSink",
    "LifecycleSettings",
    "RuntimeService",
    "SandboxKeys",
    "SandboxRecord",
    "SandboxRecords",
]


@dataclass(frozen=True)
class RuntimeService:
    """A sandbox whose command is a long-lived runtime that PID 1 keeps up (sandbox/lifecycle/
    runtime.py writes what the supervisor reads)."""

    port: int | None = None  # loopback port the agent socket forwards to (in process.listen)
    token_env: str | None = None  # env var that gets a fresh per-sandbox token
    restart: bool = True  # restart on exit, with backoff
    fail_closed_after: int = 120  # seconds without a check-in before PID 1 stops it; 0 = off


class SandboxRecord(Protocol):
    """One sandbox as the store keeps it (what should exist; Podman says what does)."""

    @property
    def name(self) -> str: ...
    @property
    def container_id(self) -> str | None: ...
    @property
    def image(self) -> str: ...
    @property
    def command(self) -> list[str]: ...
    @property
    def key_id(self) -> str | None: ...
    @property
    def state(self) -> str: ...
    @property
    def created_at(self) -> float: ...


class SandboxRecords(Protocol):
    """The sandbox records, their policy revisions and the kill switch's hold."""

    def get(self, name: str) -> SandboxRecord | None: ...
    def list(self) -> Sequence[SandboxRecord]: ...
    def claim(self, name: str, *, image: str, command: list[str]) -> bool:
        """Insert the record in state `creating`; False if the name is taken (atomically)."""
        ...

    def upsert(
        self,
        name: str,
        *,
        image: str,
        command: list[str],
        state: str,
        container_id: str | None = None,
        key_id: str | None = None,
    ) -> None: ...
    def set_state(self, name: str, state: str, container_id: str | None = None) -> None: ...
    def delete(self, name: str) -> None: ...
    def add_revision(self, sandbox: str, policy: Policy, reason: str) -> int: ...
    def delete_revision(self, sandbox: str, rev: int) -> None: ...
    def latest_policy(self, sandbox: str) -> tuple[int, Policy] | None: ...
    def set_network(self, sandbox: str, network: Network, reason: str) -> int: ...
    def hold(self, reason: str) -> None: ...
    def release(self) -> None: ...
    def held(self) -> str | None:
        """The hold's reason while the kill switch holds, else None."""
        ...


class SandboxKeys(Protocol):
    """The gateway keys sandboxes get (the proxy holds the secret; the agent never sees it)."""

    def issue(self, name: str, allowed_models: list[str] | None) -> tuple[str, str]:
        """A fresh key named `name` (a live one of that name is revoked first): (id, secret)."""
        ...

    def revoke(self, key_id: str) -> None: ...
    def discard(self, key_id: str) -> None:
        """Forget a key a failed create made (it never served a request)."""
        ...


def _monitor_argv() -> tuple[str, ...]:
    return (sys.executable, "-m", "sandbox.proxy.monitor")


@dataclass(frozen=True)
class LifecycleSettings:
    """The host's settings the lifecycle reads (the appliance builds them from its config)."""

    state_dir: Path  # host-only per-sandbox directories live in <state_dir>/sandboxes/
    service_user: str  # whose rootless Podman runs the sandboxes
    proxy_user: str  # the unprivileged user each egress proxy runs as
    gateway_url: str  # where the proxy sends `inference.local`
    audit_log: Path  # the audit chain the proxy's monitor appends to
    max_pending_approvals: int = DEFAULT_MAX_PENDING
    # How to start the proxy's privileged monitor; the appliance's own entry point writes to its
    # hash-chained audit log (appliance/control/egress_monitor.py).
    monitor_argv: tuple[str, ...] = field(default_factory=_monitor_argv)
