"""The one place a SandboxManager is built (the control plane, status, agents and tests use it).

The lifecycle (sandbox/lifecycle/) imports nothing of ours: here its ports get the appliance's
implementations. The records are the store's sandbox table, the keys and the audit log the
inference store's (each call opens its own connection, as the manager did before: a manager may
outlive a request's thread), the settings come from the config.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from appliance.audit import audit_path
from appliance.config import ApplianceConfig
from appliance.store import Store, open_store
from appliance.store.inference_store import InferenceStore
from appliance.store.sandbox_store import SandboxStore
from sandbox.lifecycle.manager import SandboxManager
from sandbox.lifecycle.podman_service import ensure_ready as _host_ready
from sandbox.lifecycle.ports import LifecycleSettings

# The proxy's privileged monitor, writing to the hash-chained audit log (not plain JSON lines).
MONITOR_ARGV = (sys.executable, "-m", "appliance.control.egress_monitor")


class StoreKeys:
    """SandboxKeys over the inference store: a sandbox's gateway key."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir

    def issue(self, name: str, allowed_models: list[str] | None) -> tuple[str, str]:
        with InferenceStore(self.state_dir) as inference:
            inference.revoke_key(name)  # a re-created sandbox gets a fresh key
            record, secret = inference.create_key(name, "sandbox", allowed_models)
        return record.id, secret

    def revoke(self, key_id: str) -> None:
        with InferenceStore(self.state_dir) as inference:
            inference.revoke_key(key_id)

    def discard(self, key_id: str) -> None:
        with InferenceStore(self.state_dir) as inference:
            inference.discard_key(key_id)


class StoreAudit:
    """AuditSink over the inference store's hash-chained audit log."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir

    def audit(self, event: str, **fields: Any) -> None:
        with InferenceStore(self.state_dir) as inference:
            inference.audit(event, **fields)


def lifecycle_settings(config: ApplianceConfig) -> LifecycleSettings:
    gateway = config.gateway
    return LifecycleSettings(
        state_dir=config.state_dir,
        service_user=config.sandbox.service_user,
        proxy_user=config.sandbox.proxy_user,
        gateway_url=f"http://{gateway.host}:{gateway.port}",
        audit_log=audit_path(config.state_dir),
        max_pending_approvals=config.sandbox.max_pending_approvals,
        monitor_argv=MONITOR_ARGV,
    )


def sandbox_manager(config: ApplianceConfig, store: Store) -> SandboxManager:
    """The manager for `config`'s sandboxes, on `store` (the caller's connection)."""
    return SandboxManager(
        lifecycle_settings(config),
        SandboxStore(store),
        StoreKeys(config.state_dir),
        StoreAudit(config.state_dir),
    )


@contextmanager
def opened_manager(config: ApplianceConfig) -> Iterator[SandboxManager]:
    """A manager on a store connection of its own, closed afterwards: for a caller on its own
    thread (an API worker, the gateway's hard-stop hook)."""
    with open_store(config.state_dir) as store:
        yield sandbox_manager(config, store)


def ensure_ready(config: ApplianceConfig) -> None:
    """Fail early, with the fix, when this host cannot run `config`'s sandboxes at all."""
    _host_ready()
