"""Reconciliation: make Podman and the proxies match the store after a restart or a crash.

A mixin of `SandboxManager` (manager.py), which provides `boxes` and `paths`,
`_labelled`, the proxy, `_start_container` and `store_audit`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sandbox.lifecycle.errors import SandboxError
from sandbox.lifecycle.kill import STOP_TIMEOUT_S
from sandbox.lifecycle.layout import SANDBOX_LABEL, SandboxPaths, listed_status
from sandbox.lifecycle.owned_paths import UnsafePathError
from sandbox.lifecycle.ports import SandboxRecords


@dataclass
class Reconciled:
    """What `SandboxManager.reconcile` found and did, by sandbox name."""

    running: list[str] = field(default_factory=list)
    proxies_restarted: list[str] = field(default_factory=list)
    restarted: list[str] = field(default_factory=list)
    stopped: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.proxies_restarted or self.restarted or self.failed)

    def as_dict(self) -> dict[str, list[str]]:
        return {k: list(v) for k, v in vars(self).items()}


class SandboxReconciliation:
    """`SandboxManager.reconcile`."""

    boxes: SandboxRecords

    if TYPE_CHECKING:  # the manager's, and EgressProxies'

        def paths(self, name: str) -> SandboxPaths: ...
        def _labelled(self, name: str | None = None) -> list[Any]: ...
        def _start_container(
            self, name: str, container: Any, record: bool = True
        ) -> dict[str, Any]: ...
        def store_audit(self, event: str, **fields: Any) -> None: ...
        def _proxy_running(self, paths: SandboxPaths) -> int | None: ...
        def _start_proxy(self, name: str, paths: SandboxPaths) -> None: ...
        def _stop_proxy(self, paths: SandboxPaths) -> None: ...

    def reconcile(self) -> Reconciled:
        """Make Podman and the proxies match the store, after a restart or a crash.

        The store is the record of what should exist; Podman of what does (containers found by
        their `appliance.sandbox` label, so none is duplicated). A running sandbox whose proxy
        died gets a new one; a sandbox that should run (state `running`, e.g. before a host
        reboot) is started again unless the kill switch holds; one whose container vanished is
        marked `missing`; a labelled container with no record is reported, never adopted:
        without its record there is no policy or key to vouch for it.
        """
        out = Reconciled()
        on_podman = {c.labels[SANDBOX_LABEL]: c for c in self._labelled()}
        held = self.boxes.held() is not None
        for record in self.boxes.list():
            container = on_podman.pop(record.name, None)
            try:
                paths = self.paths(record.name)
            except UnsafePathError as exc:  # a record older than the name rule: not the others'
                out.failed.append(f"{record.name!r}: {exc}")
                continue
            if container is None:
                if record.state != "missing":
                    self._stop_proxy(paths)
                    self.boxes.set_state(record.name, "missing")
                    self.store_audit("sandbox.missing", sandbox=record.name)
                out.missing.append(record.name)
            elif listed_status(container) == "running" and record.state == "stopped":
                # The record is the desired state: a kill records it before it stops the
                # container, so this one is being killed (or its stop failed): it stays down.
                self._stop_proxy(paths)
                self._stop_unwanted(record.name, container, out)
                out.stopped.append(record.name)
            elif listed_status(container) == "running":
                if self._proxy_running(paths) is None:
                    self._start_proxy(record.name, paths)
                    out.proxies_restarted.append(record.name)
                if record.state != "running":
                    self.boxes.set_state(record.name, "running", container.id)
                out.running.append(record.name)
            elif record.state == "running" and not held and self._still_wanted(record.name):
                try:
                    self._start_proxy(record.name, paths)
                    self._start_container(record.name, container, record=False)
                except SandboxError as exc:
                    self.boxes.set_state(record.name, "failed")
                    out.failed.append(f"{record.name}: {exc}")
                    continue
                if self._still_wanted(record.name):
                    out.restarted.append(record.name)
                else:  # killed or held while it started: the kill may have missed it
                    self._stop_proxy(paths)
                    self._stop_unwanted(record.name, container, out)
                    out.stopped.append(record.name)
            else:
                self._stop_proxy(paths)
                if record.state not in ("stopped", "failed"):
                    self.boxes.set_state(record.name, "stopped")
                out.stopped.append(record.name)
        out.orphans = sorted(on_podman)
        if out.changed:
            self.store_audit("sandbox.reconcile", **out.as_dict())
        return out

    def _still_wanted(self, name: str) -> bool:
        """Read again just before (and after) a restart: a kill since the list wins."""
        record = self.boxes.get(name)
        return record is not None and record.state == "running" and self.boxes.held() is None

    def _stop_unwanted(self, name: str, container: Any, out: Reconciled) -> None:
        """Stop a container whose record says it should not run (audited)."""
        try:
            container.stop(timeout=STOP_TIMEOUT_S)
        except Exception as exc:  # reported; the next pass tries again
            out.failed.append(f"{name}: could not stop it: {exc}")
        else:
            self.store_audit("sandbox.stop", sandbox=name, reason="reconcile: killed or held")
        if (record := self.boxes.get(name)) is not None and record.state != "stopped":
            self.boxes.set_state(name, "stopped")
