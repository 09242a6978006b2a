"""`appliance sandbox exec`: a command in a sandbox with this terminal's stdin, stdout and stderr.

podman-py's `exec_run` cannot write to the command's stdin, so this runs the Podman client
itself against the service user's API socket (`podman --remote exec -i`, as root): stdin is
forwarded until EOF, output streams as it comes, and the exit status is the command's (125-127
are Podman's own: no such container, not executable, not found). The command still starts
through the supervisor's `exec` mode: seccomp, no capabilities and the agent's Landlock domain.
"""

from __future__ import annotations

import subprocess
from typing import TYPE_CHECKING

from sandbox.compile.podman_spec import SUPERVISOR_ENTRYPOINT

if TYPE_CHECKING:
    from sandbox.lifecycle.manager import SandboxManager


def exec_argv(m: SandboxManager, name: str, command: list[str]) -> list[str]:
    """The `podman --remote exec -i` argv for `command` in sandbox `name` (as the agent)."""
    record = m.record(name)  # an unknown name: SandboxNotFound with a hint
    _rev, policy = m.policy(name)
    m.require_service()
    return [
        m.podman.podman, "--remote", "--url", m.podman.base_url,
        "exec", "-i", "--user", f"{policy.process.uid}:{policy.process.gid}",
        record.container_id or name,
        *SUPERVISOR_ENTRYPOINT, "exec", "--", *command,
    ]  # fmt: skip


def exec_attached(m: SandboxManager, name: str, command: list[str]) -> int:
    """Run `command` with this process's stdio; its exit status."""
    return subprocess.run(exec_argv(m, name, command), check=False).returncode
