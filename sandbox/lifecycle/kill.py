"""The kill switch: stop the named sandboxes at once, in parallel, and cut their egress.

A mixin of `SandboxManager` (manager.py), which provides the state (`boxes`,
`podman`) and `paths`, `_client`, `_stop_proxy` and `store_audit`.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from sandbox.lifecycle.errors import SandboxError, SandboxNotFound
from sandbox.lifecycle.layout import SandboxPaths
from sandbox.lifecycle.podman_service import PodmanService
from sandbox.lifecycle.ports import SandboxRecords

STOP_TIMEOUT_S = 3  # SIGTERM, then SIGKILL: the kill switch must finish within 5 s


class SandboxKillSwitch:
    """`SandboxManager.kill`."""

    boxes: SandboxRecords
    podman: PodmanService

    if TYPE_CHECKING:  # the manager's, and EgressProxies'

        def paths(self, name: str) -> SandboxPaths: ...
        def _client(self) -> Any: ...
        def store_audit(self, event: str, **fields: Any) -> None: ...
        def _stop_proxy(self, paths: SandboxPaths) -> None: ...

    def kill(self, names: list[str], hold: bool, reason: str) -> list[str]:
        """Stop the named sandboxes at once (in parallel: the switch must finish within 5 s)."""
        if hold:
            self.boxes.hold(reason)
        records = [r for n in names if (r := self.boxes.get(n)) is not None]
        for record in records:  # the desired state first: a reconcile meanwhile must not see
            self.boxes.set_state(record.name, "stopped")  # `running` with its container stopped
        errors = self._stop_containers([r.container_id or r.name for r in records])
        stopped: list[str] = []
        found = {r.name for r in records}
        unknown = [f"{n}: no such sandbox" for n in names if n not in found]
        failed = list(unknown)
        for record, error in zip(records, errors, strict=True):
            self._stop_proxy(self.paths(record.name))  # no egress even if the stop failed
            if error is None:
                stopped.append(record.name)
            else:
                failed.append(f"{record.name}: {error}")
        self.store_audit("kill", sandboxes=stopped, failed=failed, hold=hold, reason=reason)
        if failed == unknown and unknown:  # all it could find, it stopped: a name was wrong
            raise SandboxNotFound(
                "the kill switch could not stop " + "; ".join(failed),
                hint="`appliance sandbox list`",
            )
        if failed:
            raise SandboxError("the kill switch could not stop " + "; ".join(failed))
        return stopped

    def _stop_containers(self, ids: list[str]) -> list[str | None]:
        """SIGTERM, then SIGKILL after STOP_TIMEOUT_S, for all at once; an error per id or None."""
        if not ids:
            return []
        from podman.errors import NotFound

        self._client()  # the service must be up before the threads connect

        def stop(container_id: str) -> str | None:
            try:  # a client per thread: podman-py's requests session is not thread-safe
                with self.podman.client() as client:
                    client.containers.get(container_id).stop(timeout=STOP_TIMEOUT_S)
            except NotFound:  # already gone: stopped as far as the switch is concerned
                return None
            except Exception as exc:  # any other failure is reported, and the rest go on
                return str(exc)
            return None

        with ThreadPoolExecutor(max_workers=min(16, len(ids))) as pool:
            return list(pool.map(stop, ids))
