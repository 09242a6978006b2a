"""The kill switch: the control plane's service, and the hook the gateway's budget hard stop runs.

`KillSwitchService` (the plane's `kill_switch`) stops named sandboxes at once, optionally holding
all of them stopped until `release`. It takes no per-name lock on purpose: the switch must finish
within 5 s, and a sandbox being created holds its name's lock for up to 20 s.

The hard-stop hook: the gateway calls each `on_hard_stop` hook with the KeyRecord once per key and
month (from an executor thread, since the hook is sync). A sandbox's key is named
`sandbox-<NAME>`; for one of those the hook asks the control plane (its socket) to stop that
sandbox, as `appliance kill NAME` does. It FAILS CLOSED: when no control plane answers, the hook
stops the sandbox itself, directly through Podman, rather than let it run on past its budget.
Other keys get nothing beyond the gateway's own `budget.hard_stop` audit event.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING, Any, Protocol

from appliance.config import ApplianceConfig
from appliance.errors import (
    OPERATOR_ERRORS,
    AuthError,
    ConfigError,
    ControlPlaneDown,
    ControlPlaneNoAnswer,
)
from inference.ports import ControlPlaneHooks, KeyRecord
from sandbox.names import SANDBOX_KEY_PREFIX  # SandboxManager._new_key names sandbox keys so

if TYPE_CHECKING:
    from appliance.control.api.deps import Principal
    from appliance.control.plane import ControlPlane

log = logging.getLogger(__name__)

ASK_TIMEOUT_S = 15.0  # the switch itself takes < 5 s; past this the control plane is hung


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
        except OPERATOR_ERRORS as exc:  # expected (no such sandbox, no Podman): no trace
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
    """Each call opens its own store (the hook runs on a worker thread, not the gateway's).
    The lifecycle is imported on first use, not when the gateway starts."""

    def open_manager() -> AbstractContextManager[Any]:
        from appliance.control.wiring import opened_manager

        return opened_manager(config)

    return open_manager


class ControlPlaneKill:
    """A KillSwitch that asks the control plane, and fails closed: when the control plane cannot
    be asked (not running, this user may not connect, or it does not answer in time), it stops
    the sandboxes itself (`direct`), so a budget never fails open. An answer, even an error
    (no such sandbox), is the control plane's: nothing is done twice."""

    def __init__(
        self, config: ApplianceConfig, direct: OpenManager, timeout: float = ASK_TIMEOUT_S
    ) -> None:
        self.config = config
        self.direct = direct
        self.timeout = timeout

    def kill(self, names: list[str], hold: bool, reason: str) -> list[str]:
        from appliance.control.client import ControlClient

        try:
            with ControlClient(self.config, timeout=self.timeout) as client:
                return client.kill(names=names, hold=hold, reason=reason)["stopped"]
        except (ControlPlaneDown, AuthError, ControlPlaneNoAnswer) as exc:
            log.warning(
                "control plane not asked (%s): stopping %s directly (fail closed)", exc, names
            )
        with self.direct() as manager:
            return manager.kill(names, hold, reason)


def asking_control_plane(config: ApplianceConfig) -> OpenManager:
    @contextmanager
    def open_kill_switch() -> Iterator[KillSwitch]:
        yield ControlPlaneKill(config, manager_opener(config))

    return open_kill_switch


def store_audit(config: ApplianceConfig) -> Audit:
    def audit(event: str, **fields: Any) -> None:
        from appliance.store.inference_store import InferenceStore

        with InferenceStore(config.state_dir) as store:
            store.audit(event, **fields)

    return audit


def control_plane_hooks(config: ApplianceConfig) -> ControlPlaneHooks:
    """What `appliance serve gateway` passes to create_app."""
    hook = kill_hook(asking_control_plane(config), store_audit(config))
    return ControlPlaneHooks(on_hard_stop=[hook])


class KillSwitchService:
    """`POST /kill` and `POST /release` (the plane's `kill_switch`)."""

    def __init__(self, plane: ControlPlane) -> None:
        self.plane = plane

    def kill(
        self, who: Principal, names: list[str], all_: bool, hold: bool, reason: str
    ) -> dict[str, Any]:
        if not names and not all_ and not hold:
            raise ConfigError("name a sandbox or pass --all", hint="`appliance kill --all`")
        # No host check first: the attempt is audited (with who) even where Podman is missing.
        with self.plane.sandboxes.manager(ready=False) as m:
            targets = [r.name for r in m.boxes.list()] if all_ else list(names)
            try:
                stopped = m.kill(targets, hold, reason=reason)
            finally:  # who pulled it, also when some sandbox could not be stopped
                m.store_audit("control.kill", sandboxes=targets, hold=hold, **who.audit_fields())
                # Their turns end now, cancelled, not after waiting for a runtime that is gone.
                self.plane.turns.interrupt(targets, f"the kill switch stopped it ({reason})")
        return {"stopped": stopped, "hold": hold}

    def release(self, who: Principal) -> dict[str, Any]:
        with self.plane.sandboxes.manager(ready=False) as m:
            m.boxes.release()
            m.store_audit("release", **who.audit_fields())
        return {"hold": False}
