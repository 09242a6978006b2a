"""A sandbox's always-on runtime, host side: its agent socket, token, check-ins and parking.

A sandbox created with a `RuntimeService` (ports.py) runs its command as a long-lived runtime:
the supervisor (PID 1) restarts it, forwards the agent socket (`<root>/sock/agent.sock`, in the
sandbox `/run/appliance/sock/agent.sock`) to its loopback port, and stops it when the control
plane has not checked in (rewritten `<root>/config/checkin`) for `fail_closed_after` seconds.
The keys it reads from sandbox.json are built here (`service_config`).

A mixin of `SandboxManager` (manager.py), which provides `paths`, `_record`, `enforcement`,
`container`, `_stop_proxy` and `store_audit`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sandbox.compile.podman_spec import CONFIG_DIR, SOCK_DIR
from sandbox.lifecycle.errors import SandboxError, SandboxNotFound
from sandbox.lifecycle.layout import SandboxPaths
from sandbox.lifecycle.owned_paths import remove_owned
from sandbox.lifecycle.ports import RuntimeService, SandboxRecord
from sandbox.lifecycle.undo import Undo
from sandbox.policy import Policy
from sandbox.supervisor.timing import EXIT_GRACE_S, STOP_GRACE_S

AGENT_SOCKET = f"{SOCK_DIR}/agent.sock"
CHECKIN = f"{CONFIG_DIR}/checkin"
RUNTIME_ENV_FILE = f"{CONFIG_DIR}/runtime-env.json"
BACKOFF_INITIAL_S, BACKOFF_MAX_S, HEALTHY_AFTER_S = 1, 60, 60
# Podman's SIGKILL to PID 1 must come after PID 1's own stop: SIGTERM to the runtime's group,
# SIGKILL after STOP_GRACE_S, orphans SIGKILLed after EXIT_GRACE_S; then PID 1 records `stopped`.
# The kill switch's 3 s (kill.py) would cut a slow runtime's stop short and leave the report
# saying `running` with a dead pid.
PARK_TIMEOUT_S = int(STOP_GRACE_S + EXIT_GRACE_S) + 2
_ENV_NAME = re.compile(r"[A-Z_][A-Z0-9_]{0,63}", re.ASCII)


def check_service(service: RuntimeService, policy: Policy) -> None:
    """Refuse a service the sandbox could not run, before anything is written."""
    if service.port is not None and service.port not in policy.process.listen:
        raise SandboxError(
            f"the runtime's port {service.port} is not in the policy's process.listen "
            f"{policy.process.listen}",
            hint=f"add it: process: {{listen: [{service.port}]}}",
        )
    if service.token_env is not None and not _ENV_NAME.fullmatch(service.token_env):
        raise SandboxError(
            f"token_env {service.token_env!r} is not an environment variable name",
            hint="upper-case letters, digits and '_', not starting with a digit",
        )
    if isinstance(service.fail_closed_after, bool) or not (
        isinstance(service.fail_closed_after, int) and service.fail_closed_after >= 0
    ):
        raise SandboxError(
            f"fail_closed_after {service.fail_closed_after!r} must be whole seconds >= 0 (0 = off)"
        )


def service_config(service: RuntimeService) -> dict[str, Any]:
    """The sandbox.json keys that make PID 1 keep the runtime up (absent: today's one-shot)."""
    keys: dict[str, Any] = {
        "runtime": {
            "restart": "always" if service.restart else "never",
            "backoff_initial_s": BACKOFF_INITIAL_S,
            "backoff_max_s": BACKOFF_MAX_S,
            "healthy_after_s": HEALTHY_AFTER_S,
        },
        "checkin": {"path": CHECKIN, "after_s": service.fail_closed_after},
    }
    if service.port is not None:
        keys["agent_socket"] = {"path": AGENT_SOCKET, "port": service.port}
    if service.token_env is not None:
        keys["runtime_env_file"] = RUNTIME_ENV_FILE
    return keys


def _write_file(path: Path, text: str, mode: int, owner: tuple[int, int] | None = None) -> None:
    """Write `path` whole or not at all (a temp file in its directory, then rename)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            os.fchmod(fh.fileno(), mode)
            if owner is not None:
                os.fchown(fh.fileno(), *owner)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_checkin(paths: SandboxPaths) -> None:
    """Check in now: PID 1 reads the file's mtime (root-owned, the agent only reads it)."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()) + "\n"
    _write_file(paths.checkin, stamp, 0o644)


def prepare_service(
    undo: Undo, paths: SandboxPaths, service: RuntimeService, agent: tuple[int, int]
) -> None:
    """The service's directory and secrets, each undone by a failed create: the agent socket's
    directory (the agent uid's alone, 0700), a fresh token (host copy 0600 root; the runtime's
    env file 0400, readable by PID 1 before Landlock, never by the agent inside it)."""
    for parent, child in (
        (paths.root, paths.sock),
        (paths.config, paths.runtime_env),
        (paths.config, paths.checkin),
        (paths.private, paths.runtime_token),
    ):
        undo.add(remove_owned, parent, child)
    paths.sock.mkdir(mode=0o700, exist_ok=True)
    os.chown(paths.sock, *agent)
    paths.sock.chmod(0o700)
    for stale in (paths.runtime_env, paths.runtime_token):  # a token never outlives its create
        stale.unlink(missing_ok=True)
    if service.token_env is not None:
        token = secrets.token_urlsafe(32)
        _write_file(paths.runtime_token, token + "\n", 0o600)
        _write_file(paths.runtime_env, json.dumps({service.token_env: token}), 0o400, agent)


class SandboxRuntimes:
    """`SandboxManager.checkin`, `agent_socket`, `runtime_token`, `runtime_state`, `park`."""

    if TYPE_CHECKING:  # the manager's, and EgressProxies'

        def paths(self, name: str) -> SandboxPaths: ...
        def _record(self, name: str) -> SandboxRecord: ...
        def enforcement(self, name: str) -> dict[str, Any] | None: ...
        def container(self, name: str) -> Any: ...
        def store_audit(self, event: str, **fields: Any) -> None: ...
        def _stop_proxy(self, paths: SandboxPaths) -> None: ...

    def has_service(self, name: str) -> bool:
        """Whether the sandbox was created with a runtime service (sandbox.json says so)."""
        config = self.paths(name).config / "sandbox.json"
        try:
            return "checkin" in json.loads(config.read_text())
        except (OSError, ValueError):
            return False

    def checkin(self, name: str) -> None:
        """Tell the sandbox's supervisor that the control plane is alive (a no-op for a sandbox
        without a runtime service); SandboxNotFound for an unknown one."""
        self._record(name)
        if not self.has_service(name):
            return
        try:
            write_checkin(self.paths(name))
        except FileNotFoundError:  # removed meanwhile
            raise SandboxNotFound(f"no sandbox named {name!r}") from None

    def agent_socket(self, name: str) -> Path:
        """The host path of the unix socket PID 1 forwards to the runtime's port."""
        self._record(name)
        return self.paths(name).agent_socket

    def runtime_token(self, name: str) -> str | None:
        """The runtime's token (None: no service, or one without a token)."""
        self._record(name)
        try:
            return self.paths(name).runtime_token.read_text().strip() or None
        except FileNotFoundError:
            return None

    def runtime_state(self, name: str) -> dict[str, Any] | None:
        """The supervisor's `runtime` report section (None: no report, or no runtime)."""
        self._record(name)
        report = self.enforcement(name)
        runtime = report.get("runtime") if report else None
        return runtime if isinstance(runtime, dict) else None

    def park(self, name: str, reason: str, order: int | None = None) -> None:
        """Stop the container and its egress, keeping the record's state: the next reconcile
        starts it again unless the kill switch holds (control-plane shutdown). `order`: its
        place among the sandboxes parked together (recorded)."""
        from podman.errors import NotFound

        record = self._record(name)
        with contextlib.suppress(NotFound):
            self.container(name).stop(timeout=PARK_TIMEOUT_S)
        self._stop_proxy(self.paths(name))
        placed = {"order": order} if order is not None else {}
        self.store_audit(
            "sandbox.parked", sandbox=name, reason=reason, state=record.state, **placed
        )
