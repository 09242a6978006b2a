"""Creating a sandbox, all or nothing: its record and policy revision, directories, key, proxy
and container, each step registered with its undo as soon as it exists (undo.py).

A mixin of `SandboxManager` (manager.py), which provides the state (`settings`, `boxes`, `keys`,
`podman`) and the other steps (`paths`, `_client`, the proxy, `_start_container`).
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sandbox.compile.landlock import landlock_rules
from sandbox.compile.podman_spec import SandboxMounts, podman_spec
from sandbox.compile.seccomp import seccomp_profile
from sandbox.lifecycle.errors import HostNotReady, SandboxConflict
from sandbox.lifecycle.layout import STATE_LABEL, SandboxPaths
from sandbox.lifecycle.owned_paths import remove_owned
from sandbox.lifecycle.podman_service import PodmanService
from sandbox.lifecycle.ports import (
    LifecycleSettings,
    RuntimeService,
    SandboxKeys,
    SandboxRecord,
    SandboxRecords,
)
from sandbox.lifecycle.runtime import check_service, prepare_service, service_config
from sandbox.lifecycle.undo import Undo, end_proxy, undo_new_dirs
from sandbox.names import SANDBOX_KEY_PREFIX, SUPERVISOR_DIR, check_name
from sandbox.policy import Endpoint, Policy

SUPERVISOR_SRC = Path(__file__).resolve().parent.parent / "supervisor"
HOME = "/home/agent"


def _mapped_uid(service_user: str, container_uid: int) -> int:
    """The host uid that rootless Podman maps `container_uid` to (subuid range, 1 -> start)."""
    for line in Path("/etc/subuid").read_text().splitlines():
        user, start, _count = line.split(":")
        if user == service_user:
            return int(start) + container_uid - 1
    raise HostNotReady(f"no subuid range for {service_user!r}", hint="run `appliance doctor`")


def install_file(src: Path, dest: Path) -> None:
    """Copy `src` to `dest` (0644) unless it is there already, by rename: every sandbox mounts
    this one supervisor directory, and one starting while another's create rewrote a module in
    place read half a file (an ImportError at start, seen with two creates at once)."""
    data = src.read_bytes()
    try:
        if dest.read_bytes() == data:
            return
    except FileNotFoundError:
        pass
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{threading.get_ident()}")
    tmp.write_bytes(data)
    tmp.chmod(0o644)
    os.replace(tmp, dest)


class SandboxCreation:
    """`SandboxManager.create` and its steps."""

    settings: LifecycleSettings
    boxes: SandboxRecords
    keys: SandboxKeys
    podman: PodmanService

    if TYPE_CHECKING:  # the manager's, and EgressProxies'

        @property
        def instance(self) -> str: ...
        def paths(self, name: str) -> SandboxPaths: ...
        def _record(self, name: str) -> SandboxRecord: ...
        def _refuse_if_held(self) -> None: ...
        def _client(self) -> Any: ...
        def _start_container(
            self, name: str, container: Any, record: bool = True
        ) -> dict[str, Any]: ...
        def store_audit(self, event: str, **fields: Any) -> None: ...
        def _spawn_proxy(
            self, name: str, paths: SandboxPaths
        ) -> subprocess.Popen[bytes] | None: ...
        def _await_proxy(
            self, name: str, paths: SandboxPaths, proc: subprocess.Popen[bytes] | None
        ) -> None: ...

    def create(
        self,
        name: str,
        policy: Policy,
        command: list[str] | None,
        image: str | None = None,
        agent_files: dict[str, str] | None = None,
        allowed_models: list[str] | None = None,
        service: RuntimeService | None = None,
    ) -> SandboxRecord:
        """Create and start a sandbox. `agent_files` (name -> text) are mounted read-only at
        /run/appliance/agent (the policy must list that path in read_only). `allowed_models`:
        the only models its key may use (None: any), set when the key is made, before the
        sandbox runs. `service`: the command is a long-lived runtime PID 1 keeps up, with an
        agent socket, a fresh token and check-ins (runtime.py); checked in once before it starts.

        All or nothing: the name is checked before anything is written, and a failure at any
        step undoes what this call made (record, revision, directories, key, proxy, container);
        a home kept by `rm --keep-home` stays."""
        check_name(name, "sandbox")
        if service is not None:
            check_service(service, policy)
        self._refuse_if_held()
        paths = self.paths(name)
        image = image or "localhost/appliance-base:latest"
        command = command or ["sleep", "infinity"]
        with Undo(f"sandbox {name}") as undo:
            if not self.boxes.claim(name, image=image, command=command):
                raise SandboxConflict(
                    f"sandbox {name!r} exists", hint=f"`appliance sandbox rm {name}`"
                )
            undo.add(self.boxes.delete, name)
            undo.add(self.store_audit, "sandbox.create_undone", sandbox=name)
            policy = self._carry_over_network(name, policy)
            rev = self.boxes.add_revision(name, policy, "created")
            undo.add(self.boxes.delete_revision, name, rev)
            undo_new_dirs(undo, [paths.home, paths.private, paths.root], paths.private.parent)
            agent = self._prepare_dirs(paths, policy, command, service)
            if service is not None:
                prepare_service(undo, paths, service, agent)
            if agent_files is not None:
                self._write_agent_files(paths, agent_files)
            key_id = self._new_key(name, paths, allowed_models)
            undo.add(self.keys.discard, key_id)
            self.boxes.upsert(name, image=image, command=command, state="creating", key_id=key_id)
            self.store_audit("sandbox.create", sandbox=name, policy_rev=rev)
            self._create_container(
                undo, name, policy, image, command, paths, agent_files, service is not None
            )
            undo.commit()
        return self._record(name)

    def _create_container(
        self,
        undo: Undo,
        name: str,
        policy: Policy,
        image: str,
        command: list[str],
        paths: SandboxPaths,
        agent_files: dict[str, str] | None,
        has_service: bool = False,
    ) -> None:
        """The proxy and the container, each registered in `undo` as soon as it exists."""
        proxy = self._spawn_proxy(name, paths)
        if proxy is not None:
            undo.add(end_proxy, proxy, paths.proxy_pid)
        client = self._client()
        mounts = SandboxMounts(
            egress_dir=str(paths.egress),
            supervisor_dir=str(paths.root.parent / SUPERVISOR_DIR),
            config_dir=str(paths.config),
            report_dir=str(paths.report),
            seccomp_path=str(paths.seccomp),
            state_dir=str(paths.home) if HOME in policy.filesystem.read_write else None,
            agent_dir=str(paths.agent) if agent_files is not None else None,
            sock_dir=str(paths.sock) if has_service else None,
        )
        spec = podman_spec(policy, name=name, image=image, mounts=mounts, command=command)
        spec["labels"][STATE_LABEL] = self.instance
        from podman.errors import APIError

        try:
            container = client.containers.create(**spec)
        except APIError:
            # A taken name comes back as a 500 from Podman's storage layer, not a 409: ask
            # Podman whether that name exists rather than read its message.
            if not client.containers.exists(name):
                raise
            raise SandboxConflict(
                f"Podman already has a container named {name!r} that this appliance did "
                "not create (another state dir, or made by hand)",
                hint=f"pick another name, or remove it: podman rm -f {name} (as the "
                f"{self.settings.service_user} user)",
            ) from None
        undo.add(container.remove, force=True)
        self.boxes.set_state(name, "created", container.id)
        self._start_container(name, container)
        self._await_proxy(name, paths, proxy)

    def _carry_over_network(self, name: str, policy: Policy) -> Policy:
        """A re-created sandbox keeps the rules its earlier revisions gained: approvals (allow)
        and operators' blocks (deny: else a block would vanish under a wildcard allow)."""
        latest = self.boxes.latest_policy(name)
        if latest is None:
            return policy

        def merged(mine: list[Endpoint], earlier: list[Endpoint]) -> list[Endpoint]:
            known = {e.model_dump_json() for e in mine}
            return [*mine, *(e for e in earlier if e.model_dump_json() not in known)]

        old = latest[1].network
        network = policy.network.model_copy(
            update={
                "allow": merged(policy.network.allow, old.allow),
                "deny": merged(policy.network.deny, old.deny),
            }
        )
        return policy.with_network(network)

    def _prepare_dirs(
        self,
        paths: SandboxPaths,
        policy: Policy,
        command: list[str],
        service: RuntimeService | None = None,
    ) -> tuple[int, int]:
        """The sandbox's directories and config; the host uid and gid its agent maps to."""
        acct = self.podman.account
        agent = _mapped_uid(acct.pw_name, policy.process.uid)
        agent_gid = agent - policy.process.uid + policy.process.gid  # same offset for subgid
        sandboxes = paths.root.parent
        sandboxes.mkdir(mode=0o755, exist_ok=True)
        supervisor = sandboxes / SUPERVISOR_DIR  # a reserved name: no sandbox's (sandbox/names.py)
        supervisor.mkdir(mode=0o755, exist_ok=True)
        for src in SUPERVISOR_SRC.glob("*.py"):
            install_file(src, supervisor / src.name)
        for d in (paths.root, paths.config):
            d.mkdir(mode=0o755, parents=True, exist_ok=True)
        # The egress directory too is the agent's alone: its socket (0666, bound by root) then
        # answers only the sandbox's side (the forwarder runs as the agent uid). Every proxy
        # runs as the same unprivileged user and must not reach another sandbox's socket.
        for d in (paths.egress, paths.report, paths.home):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chown(d, agent, agent_gid)
            d.chmod(0o700)  # an existing one (from an older version) too
        paths.private.mkdir(mode=0o700, parents=True, exist_ok=True)
        paths.policy.write_text(policy.to_yaml())
        paths.seccomp.write_text(json.dumps(seccomp_profile(policy), indent=1))
        paths.seccomp.chmod(0o644)
        sandbox_json = {
            "command": command,
            "cwd": HOME if HOME in policy.filesystem.read_write else "/",
            "env": {
                "PATH": "/usr/local/bin:/usr/bin:/bin",
                "HOME": HOME,
                "LANG": "C.UTF-8",
                **{k: "http://127.0.0.1:3128" for k in ("HTTP_PROXY", "HTTPS_PROXY",
                                                        "http_proxy", "https_proxy")},
                "NO_PROXY": "127.0.0.1,localhost",
            },
            "listen": "127.0.0.1:3128",
            "egress_socket": "/run/appliance/egress/egress.sock",
            "report_path": "/run/appliance/report/enforcement.json",
            "landlock": landlock_rules(policy),
            **(service_config(service) if service is not None else {}),
        }  # fmt: skip
        (paths.config / "sandbox.json").write_text(json.dumps(sandbox_json, indent=1))
        (paths.config / "sandbox.json").chmod(0o644)
        (paths.report / "enforcement.json").unlink(missing_ok=True)
        return agent, agent_gid

    def _write_agent_files(self, paths: SandboxPaths, files: dict[str, str]) -> None:
        remove_owned(paths.root, paths.agent)  # nothing stale from an earlier version
        paths.agent.mkdir(mode=0o755, parents=True)
        for filename, text in files.items():
            target = paths.agent / filename
            target.write_text(text)
            target.chmod(0o644)  # root-owned: the agent reads, never writes

    def _new_key(self, name: str, paths: SandboxPaths, allowed_models: list[str] | None) -> str:
        # A re-created sandbox gets a fresh key (the port revokes a live one of that name).
        key_id, secret = self.keys.issue(SANDBOX_KEY_PREFIX + name, allowed_models)
        fd = os.open(paths.key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secret + "\n")
        return key_id
