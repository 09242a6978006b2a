"""Sandbox lifecycle: policy revisions, the per-sandbox egress proxy and key, and the container.

The control plane (root) prepares each sandbox's directories under the service user's home, so
rootless Podman (running as that user) can bind them; starts one egress proxy process per
sandbox on a unix socket inside the sandbox's egress directory; and drives Podman through
podman-py on the service user's socket. The agent never sees its key: the proxy holds it.

The manager's steps live by concern: create.py (create, all or nothing), proxy_launch.py (the
proxy process), kill.py (the kill switch), reconcile.py (after a restart or crash), layout.py
(directories and labels). What it needs from the host comes in through ports.py; the appliance
builds it in one place (appliance/control/wiring.py `sandbox_manager`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

from sandbox.compile.podman_spec import SUPERVISOR_ENTRYPOINT, policy_digest
from sandbox.lifecycle.create import SandboxCreation
from sandbox.lifecycle.errors import (
    PolicyFileError,
    SandboxConflict,
    SandboxError,
    SandboxNotFound,
)
from sandbox.lifecycle.kill import STOP_TIMEOUT_S, SandboxKillSwitch
from sandbox.lifecycle.layout import SANDBOX_LABEL, STATE_LABEL, SandboxPaths, listed_status
from sandbox.lifecycle.owned_paths import owned_child, remove_owned
from sandbox.lifecycle.podman_service import PodmanService
from sandbox.lifecycle.ports import (
    AuditSink,
    LifecycleSettings,
    SandboxKeys,
    SandboxRecord,
    SandboxRecords,
)
from sandbox.lifecycle.proxy_launch import EgressProxies
from sandbox.lifecycle.reconcile import Reconciled, SandboxReconciliation
from sandbox.lifecycle.runtime import SandboxRuntimes, write_checkin
from sandbox.names import check_name
from sandbox.policy import Endpoint, Network, Policy, load_policy
from sandbox.yamlfile import YamlError

__all__ = [
    "STOP_TIMEOUT_S",
    "Reconciled",
    "SandboxError",
    "SandboxManager",
    "SandboxPaths",
    "read_policy_file",
]

REPORT_TIMEOUT_S = 20.0


def read_policy_file(path: Path) -> Policy:
    """The policy in `path`; PolicyFileError (file:line: what is wrong) when it is not one."""
    try:
        return load_policy(path)
    except YamlError as exc:
        raise PolicyFileError(str(exc)) from None


class SandboxManager(
    SandboxCreation, EgressProxies, SandboxKillSwitch, SandboxReconciliation, SandboxRuntimes
):
    """The sandboxes on the service user's Podman, their proxies and keys (ports.py: what the
    host hands in; appliance/control/wiring.py builds one)."""

    def __init__(
        self,
        settings: LifecycleSettings,
        records: SandboxRecords,
        keys: SandboxKeys,
        audit: AuditSink,
    ) -> None:
        self.settings = settings
        self.boxes = records
        self.keys = keys
        self.audit = audit
        self.podman = PodmanService(user=settings.service_user)
        self._podman_client: Any = None

    # -- paths and helpers -------------------------------------------------------------------

    def paths(self, name: str) -> SandboxPaths:
        """The sandbox's directories, each strictly inside the directory that owns it (a name
        like '' or '..' from a record older than the name rule is refused here)."""
        home = Path(self.podman.account.pw_dir)
        boxes, private = home / "sandboxes", self.settings.state_dir / "sandboxes"
        paths = SandboxPaths(
            root=owned_child(boxes, boxes / name), private=owned_child(private, private / name)
        )
        owned_child(home / "homes", paths.home)
        return paths

    @property
    def instance(self) -> str:
        """Which control plane owns a container: one Podman may serve several state dirs."""
        return hashlib.sha256(os.fsencode(self.settings.state_dir.resolve())).hexdigest()[:12]

    def _labelled(self, name: str | None = None) -> list[Any]:
        """This control plane's sandbox containers on Podman (all, or the one named)."""
        sandbox = SANDBOX_LABEL + (f"={name}" if name is not None else "")  # '' is no "all"
        return self._client().containers.list(
            all=True, filters=[f"label={sandbox}", f"label={STATE_LABEL}={self.instance}"]
        )

    def _record(self, name: str) -> SandboxRecord:
        record = self.boxes.get(name)
        if record is None:
            raise SandboxNotFound(f"no sandbox named {name!r}", hint="`appliance sandbox list`")
        return record

    def record(self, name: str) -> SandboxRecord:
        """The sandbox's record; SandboxNotFound (with a hint) for an unknown name."""
        return self._record(name)

    def require_service(self) -> None:
        """Reach (or start) the Podman service: a command that needs it fails here, not later."""
        self._client()

    def _refuse_if_held(self) -> None:
        if (held := self.boxes.held()) is not None:
            raise SandboxConflict(
                f"sandboxes are held by the kill switch: {held}",
                hint="`appliance release` lifts the hold",
            )

    def _client(self):
        if self._podman_client is None:  # one ping and one client per manager, not per call
            self._podman_client = self.podman.start()
        return self._podman_client

    # -- container state ---------------------------------------------------------------------

    def _start_container(self, name: str, container: Any, record: bool = True) -> dict[str, Any]:
        paths = self.paths(name)
        (paths.report / "enforcement.json").unlink(missing_ok=True)
        if self.has_service(name):  # create, start and reconcile: a fresh check-in first, and
            paths.agent_socket.unlink(missing_ok=True)  # no socket left by the last container
            write_checkin(paths)
        container.start()
        report = self._wait_report(paths, container)
        if record:  # reconcile's restart does not: the record already says so, or a kill wrote
            self.boxes.set_state(name, "running")  # `stopped` meanwhile, and that must stay
        self.store_audit("sandbox.start", sandbox=name, landlock_abi=report["landlock"]["abi"])
        return report

    def _wait_report(self, paths: SandboxPaths, container: Any) -> dict[str, Any]:
        deadline = time.monotonic() + REPORT_TIMEOUT_S
        report_file = paths.report / "enforcement.json"
        polls = 0
        while time.monotonic() < deadline:
            if report_file.is_file():
                report = json.loads(report_file.read_text())
                # A runtime that waits for a check-in did start: Landlock was checked first.
                waiting = (report.get("runtime") or {}).get("state") == "waiting"
                if not report.get("agent_started") and not waiting:
                    why = report.get("landlock", {}).get("error") or "agent not started"
                    raise SandboxError(f"sandbox refused to start: {why}")
                return report
            polls += 1
            if polls % 10 == 0:  # the file is cheap to look for; Podman is asked every 100 ms
                container.reload()
                if container.status in ("exited", "stopped"):
                    logs = container.logs(stdout=True, stderr=True)
                    text = b"".join(logs).decode(errors="replace")
                    raise SandboxError(f"sandbox exited during start:\n{text[-1500:]}")
            time.sleep(0.01)
        raise SandboxError(f"no enforcement report after {REPORT_TIMEOUT_S:.0f} s")

    def enforcement(self, name: str) -> dict[str, Any] | None:
        report = self.paths(name).report / "enforcement.json"
        return json.loads(report.read_text()) if report.is_file() else None

    def container(self, name: str) -> Any:
        record = self._record(name)
        return self._client().containers.get(record.container_id or name)

    def exec(
        self,
        name: str,
        command: list[str],
        env: dict[str, str] | None = None,
        timeout_s: float = 600.0,
    ) -> tuple[int, bytes, bytes]:
        """Run `command` in the sandbox as the agent, inside the agent's Landlock domain (the
        supervisor's `exec` mode); returns (exit code, stdout, stderr)."""
        record = self._record(name)
        _rev, policy = self.policy(name)
        argv = [*SUPERVISOR_ENTRYPOINT, "exec"]
        for key, value in (env or {}).items():
            argv += ["--env", f"{key}={value}"]
        self._client()  # the service must be up
        # Its own client: the API call lasts as long as the command (an agent turn: minutes).
        with self.podman.client(timeout=timeout_s) as client:
            container = client.containers.get(record.container_id or name)
            code, (out, err) = container.exec_run(
                [*argv, "--", *command],
                user=f"{policy.process.uid}:{policy.process.gid}",
                demux=True,
            )
        return code or 0, out or b"", err or b""

    def start(self, name: str) -> None:
        self._refuse_if_held()
        self._start_proxy(name, self.paths(name))
        self._start_container(name, self.container(name))

    def stop(self, name: str, timeout: int = STOP_TIMEOUT_S) -> None:
        self.container(name).stop(timeout=timeout)
        self._stop_proxy(self.paths(name))
        self.boxes.set_state(name, "stopped")
        self.store_audit("sandbox.stop", sandbox=name)

    def remove(self, name: str, keep_home: bool = False) -> None:
        """Remove the container, proxy, key and directories; `keep_home` keeps the agent's
        state volume (an upgrade re-creates the sandbox around it)."""
        if self.boxes.get(name) is None:
            check_name(name, "sandbox")  # a hostile name names no orphan either
            if self._remove_orphan(name):
                return
        record = self._record(name)
        paths = self.paths(name)  # before anything is removed: refuses '', '.', '..'
        from podman.errors import NotFound

        with contextlib.suppress(NotFound):  # already gone from Podman: still forget it here
            self.container(name).remove(force=True)
        self._stop_proxy(paths)
        if record.key_id:
            self.keys.revoke(record.key_id)
        remove_owned(paths.root.parent, paths.root)
        remove_owned(paths.private.parent, paths.private)
        if not keep_home:
            remove_owned(paths.home.parent, paths.home)
        self.boxes.delete(name)  # policy revisions stay: a re-created sandbox inherits them
        self.store_audit("sandbox.rm", sandbox=name)

    def _remove_orphan(self, name: str) -> bool:
        """A labelled container the store does not know (see reconcile): remove it."""
        found = self._labelled(name)
        for container in found:
            container.remove(force=True)
            self.store_audit("sandbox.rm", sandbox=name, orphan=True)
        return bool(found)

    def list(self) -> list[dict[str, Any]]:
        live: dict[str, str] = {}
        try:
            for c in self._labelled():
                live[c.labels[SANDBOX_LABEL]] = listed_status(c)
        except SandboxError:
            pass  # podman unavailable: report what the store knows
        return [
            {
                "name": r.name,
                "state": r.state,
                "container": live.get(r.name, "missing"),
                "image": r.image,
                "command": r.command,
                "created_at": r.created_at,
            }
            for r in self.boxes.list()
        ]

    # -- policy ------------------------------------------------------------------------------

    def policy(self, name: str) -> tuple[int, Policy]:
        latest = self.boxes.latest_policy(name)
        if latest is None:
            raise SandboxNotFound(f"no policy for sandbox {name!r}")
        return latest

    def set_policy(self, name: str, new: Policy) -> int:
        """Hot-reload the network part; the static part is fixed at creation. Idempotent: the
        policy in force again is its revision, not a new one (nothing reloaded)."""
        rev, current = self.policy(name)
        if policy_digest(new) != policy_digest(current):
            raise SandboxError(
                "only `network` can change on a running sandbox; the static part is fixed",
                hint=f"re-create it: `appliance sandbox rm {name}` then `sandbox create`",
            )
        if new.network.model_dump(mode="json") == current.network.model_dump(mode="json"):
            return rev
        return self.apply_network(name, new.network, "policy set")

    def apply_network(self, name: str, network: Network, reason: str) -> int:
        rev = self.boxes.set_network(name, network, reason)
        paths = self.paths(name)
        paths.policy.write_text(self.policy(name)[1].to_yaml())
        if (pid := self._proxy_running(paths)) is not None:
            os.kill(pid, signal.SIGHUP)  # the proxy re-reads its policy file
        self.store_audit("policy.revision", sandbox=name, rev=rev, reason=reason)
        return rev

    @staticmethod
    def persistable(approval_id: str, host: object, port: object) -> Endpoint:
        """The rule `approve --persist` may write for a pending `host:port`: one concrete
        public host and one port, or SandboxError (checked before anything is approved)."""
        from sandbox.proxy.approvals import approval_endpoint

        try:
            return approval_endpoint(host, port)
        except ValueError as exc:
            raise SandboxError(
                f"approval {approval_id} cannot be persisted: {exc}",
                hint="approve it without --persist, or add a rule: `appliance sandbox policy set`",
            ) from None

    def persist_approval(self, name: str, endpoint: Endpoint, approval_id: str) -> int:
        """A new revision allowing `endpoint` (from `persistable`), on the operator's command.
        The proxy never persists: its word alone must not outlive it (sandbox/proxy/monitor.py)."""
        _rev, policy = self.policy(name)
        allow = policy.network.allow
        network = policy.network.model_copy(
            update={"allow": allow if endpoint in allow else [*allow, endpoint]}
        )
        return self.apply_network(name, network, f"approval {approval_id} persisted")

    def store_audit(self, event: str, **fields: Any) -> None:
        """One record in the host's audit log (the port handed in)."""
        self.audit.audit(event, **fields)
