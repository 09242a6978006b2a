"""Where a sandbox lives: its directories on the host, and the labels that find its container.

Each sandbox has a directory bound into its container (under the service user's home), a
host-only one for its key, policy and proxy (under the state dir), and a home that outlives it.
On Podman its container carries the sandbox's name and which control plane (state dir) made it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

SANDBOX_LABEL = "appliance.sandbox"  # set by podman_spec: the sandbox's name
STATE_LABEL = "appliance.state"  # which state dir (control plane) created it


@dataclass(frozen=True)
class SandboxPaths:
    root: Path  # <service home>/sandboxes/<name>: bound into the container (traversable)
    private: Path  # <state_dir>/sandboxes/<name>: host-only (key, proxy admin socket, logs)

    @property
    def egress(self) -> Path:
        return self.root / "egress"

    @property
    def config(self) -> Path:
        return self.root / "config"

    @property
    def report(self) -> Path:
        return self.root / "report"

    @property
    def home(self) -> Path:
        return self.root.parent.parent / "homes" / self.root.name  # survives `rm --keep-home`

    @property
    def agent(self) -> Path:
        return self.root / "agent"

    @property
    def sock(self) -> Path:
        return self.root / "sock"  # a runtime service's: PID 1 binds the agent socket here

    @property
    def agent_socket(self) -> Path:
        return self.sock / "agent.sock"  # forwarded to the runtime's loopback port

    @property
    def checkin(self) -> Path:
        return self.config / "checkin"  # its mtime: when the control plane last checked in

    @property
    def runtime_env(self) -> Path:
        return self.config / "runtime-env.json"  # the runtime's secret env (PID 1 reads it)

    @property
    def seccomp(self) -> Path:
        return self.root / "seccomp.json"

    @property
    def key(self) -> Path:
        return self.private / "key"

    @property
    def runtime_token(self) -> Path:
        return self.private / "runtime-token"  # the runtime's token, for the host to drive it

    @property
    def policy(self) -> Path:
        return self.private / "policy.yaml"

    @property
    def admin_socket(self) -> Path:
        return self.private / "proxy-admin.sock"

    @property
    def proxy_pid(self) -> Path:
        return self.private / "proxy.pid"

    @property
    def proxy_log(self) -> Path:
        return self.private / "proxy.log"


def listed_status(container: Any) -> str:
    """A container's status from a list result, where State is a plain string (not inspect's)."""
    state = container.attrs.get("State")
    return state if isinstance(state, str) else (state or {}).get("Status", "?")
