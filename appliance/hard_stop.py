"""Monthly budget hard stop -> kill switch: the hook `appliance serve gateway` hands the gateway.

The gateway calls each `on_hard_stop` hook with the KeyRecord once per key and month (from an
executor thread, since the hook is sync). A sandbox's key is named `sandbox-<NAME>`; for one of
those the hook stops that sandbox exactly as `appliance kill NAME` does. Other keys get nothing
beyond the gateway's own `budget.hard_stop` audit event.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any, Protocol

from appliance.config import ApplianceConfig
from appliance.errors import ApplianceError
from appliance.names import SANDBOX_KEY_PREFIX  # SandboxManager._new_key names sandbox keys so
from inference.ports import ControlPlaneHooks, KeyRecord

log = logging.getLogger(__name__)


class KillSwitch(Protocol):
    def kill(self, names: list[str], hold: bool, reason: str) -> list[str]: ...


OpenManager = Callable[[], AbstractContextManager[KillSwitch]]
Audit = Callable[..., None]


def sandbox_for_key(key: KeyRecord) -> str | None:
    """The sandbox that owns `key`, or None for a client's key.

    The owner kind is checked too: an operator may name a client key `sandbox-x`, and that key
    running out of budget must not stop sandbox x.
    """
    if key.owner_kind != "sandbox" or not key.name.startswith(SANDBOX_KEY_PREFIX):
        return None
    return key.name[len(SANDBOX_KEY_PREFIX) :] or None


def kill_hook(open_manager: OpenManager, audit: Audit | None = None) -> Callable[[KeyRecord], None]:
    """A hard-stop hook that never raises: failures are logged (and audited when possible)."""

    def on_hard_stop(key: KeyRecord) -> None:
        name = sandbox_for_key(key)
        if name is None:
            return  # not a sandbox's key: the gateway's budget.hard_stop audit is all there is
        reason = f"monthly budget hard stop for key {key.name} ({key.id})"
        try:
            with open_manager() as manager:
                stopped = manager.kill([name], hold=False, reason=reason)
            log.warning("budget hard stop for %s: stopped %s", key.name, stopped or "nothing")
        except ApplianceError as exc:  # expected failures (no such sandbox, no Podman): no trace
            log.error("budget hard stop for %s: killing sandbox %s failed: %s", key.name, name, exc)
            _audit_failure(audit, name, key, exc)
        except Exception as exc:  # the gateway keeps serving whatever the kill path does
            log.exception("budget hard stop for %s: killing sandbox %s failed", key.name, name)
            _audit_failure(audit, name, key, exc)

    return on_hard_stop


def _audit_failure(audit: Audit | None, name: str, key: KeyRecord, exc: Exception) -> None:
    # The gateway's budget.hard_stop event is already stored; this says the kill did not follow
    # (kill() audits its own partial failures, but not e.g. a store or Podman that never opened).
    if audit is None:
        return
    try:
        audit(
            "hard_stop.kill_failed",
            sandbox=name,
            key_id=key.id,
            key_name=key.name,
            error=str(exc),
        )
    except Exception:
        log.exception("auditing the failed kill of %s failed", name)


def manager_opener(config: ApplianceConfig) -> OpenManager:
    """Each call opens its own store (the hook runs on a worker thread, not the gateway's)."""

    @contextmanager
    def open_manager() -> Iterator[Any]:
        from appliance.sandboxes import SandboxManager
        from appliance.store import open_store

        with open_store(config.state_dir) as store:
            yield SandboxManager(config, store)

    return open_manager


def store_audit(config: ApplianceConfig) -> Audit:
    def audit(event: str, **fields: Any) -> None:
        from appliance.store.inference_store import InferenceStore

        with InferenceStore(config.state_dir) as store:
            store.audit(event, **fields)

    return audit


def control_plane_hooks(config: ApplianceConfig) -> ControlPlaneHooks:
    """What `appliance serve gateway` passes to create_app."""
    return ControlPlaneHooks(on_hard_stop=[kill_hook(manager_opener(config), store_audit(config))])
