"""Sandbox lifecycle: policy revisions, the per-sandbox egress proxy and key, and the container.

The control plane (root) prepares each sandbox's directories under the service user's home, so
rootless Podman (running as that user) can bind them; starts one egress proxy process per
sandbox on a unix socket inside the sandbox's egress directory; and drives Podman through
podman-py on the service user's socket. The agent never sees its key: the proxy holds it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.audit import audit_path
from appliance.config import ApplianceConfig
from appliance.errors import ApplianceError, BackendError, NotFoundError, PreflightError
from appliance.names import check_name
from appliance.owned_paths import UnsafePathError, owned_child, remove_owned
from appliance.podman_service import PodmanService
from appliance.store import Store
from appliance.store.inference_store import InferenceStore
from appliance.store.sandbox_store import SandboxRecord, SandboxStore
from appliance.undo import Undo, discard_key, end_proxy, undo_new_dirs
from sandbox.compile.landlock import landlock_rules
from sandbox.compile.podman_spec import (
    SUPERVISOR_ENTRYPOINT,
    SandboxMounts,
    podman_spec,
    policy_digest,
)
from sandbox.compile.seccomp import seccomp_profile
from sandbox.policy import Endpoint, Network, Policy, load_policy
from sandbox.yamlfile import YamlError

SUPERVISOR_SRC = Path(__file__).resolve().parent.parent / "sandbox" / "supervisor"
HOME = "/home/agent"
REPORT_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 3  # SIGTERM, then SIGKILL: the kill switch must finish within 5 s
SANDBOX_LABEL = "appliance.sandbox"  # set by podman_spec: the sandbox's name
STATE_LABEL = "appliance.state"  # which state dir (control plane) created it
UNIX_PATH_MAX = 107  # sun_path is 108 bytes with the terminating NUL


class SandboxError(ApplianceError):
    hint = "see `appliance sandbox logs NAME` and the proxy log in the state directory"


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
    def seccomp(self) -> Path:
        return self.root / "seccomp.json"

    @property
    def key(self) -> Path:
        return self.private / "key"

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


def read_policy_file(path: Path) -> Policy:
    try:
        return load_policy(path)
    except YamlError as exc:
        from appliance.errors import ConfigError

        raise ConfigError(str(exc), hint="fix the policy file at the line named") from None


def _listed_status(container: Any) -> str:
    """A container's status from a list result, where State is a plain string (not inspect's)."""
    state = container.attrs.get("State")
    return state if isinstance(state, str) else (state or {}).get("Status", "?")


def _mapped_uid(service_user: str, container_uid: int) -> int:
    """The host uid that rootless Podman maps `container_uid` to (subuid range, 1 -> start)."""
    for line in Path("/etc/subuid").read_text().splitlines():
        user, start, _count = line.split(":")
        if user == service_user:
            return int(start) + container_uid - 1
    raise PreflightError(f"no subuid range for {service_user!r}", hint="run `appliance doctor`")


class SandboxManager:
    def __init__(self, config: ApplianceConfig, store: Store) -> None:
        self.config = config
        self.store = store
        self.boxes = SandboxStore(store)
        self.podman = PodmanService(user=config.sandbox.service_user)
        self._podman_client: Any = None

    # -- paths and helpers -------------------------------------------------------------------

    def paths(self, name: str) -> SandboxPaths:
        """The sandbox's directories, each strictly inside the directory that owns it (a name
        like '' or '..' from a record older than the name rule is refused here)."""
        home = Path(self.podman.account.pw_dir)
        boxes, private = home / "sandboxes", self.config.state_dir / "sandboxes"
        paths = SandboxPaths(
            root=owned_child(boxes, boxes / name), private=owned_child(private, private / name)
        )
        owned_child(home / "homes", paths.home)
        return paths

    @property
    def instance(self) -> str:
        """Which control plane owns a container: one Podman may serve several state dirs."""
        return hashlib.sha256(os.fsencode(self.config.state_dir.resolve())).hexdigest()[:12]

    def _labelled(self, name: str | None = None) -> list[Any]:
        """This control plane's sandbox containers on Podman (all, or the one named)."""
        sandbox = SANDBOX_LABEL + (f"={name}" if name is not None else "")  # '' is no "all"
        return self._client().containers.list(
            all=True, filters=[f"label={sandbox}", f"label={STATE_LABEL}={self.instance}"]
        )

    def _record(self, name: str) -> SandboxRecord:
        record = self.boxes.get(name)
        if record is None:
            raise NotFoundError(f"no sandbox named {name!r}", hint="`appliance sandbox list`")
        return record

    def _refuse_if_held(self) -> None:
        if (held := self.boxes.held()) is not None:
            raise SandboxError(
                f"sandboxes are held by the kill switch: {held}",
                hint="`appliance release` lifts the hold",
            )

    def _client(self):
        if self._podman_client is None:  # one ping and one client per manager, not per call
            self._podman_client = self.podman.start()
        return self._podman_client

    # -- create ------------------------------------------------------------------------------

    def create(
        self,
        name: str,
        policy: Policy,
        command: list[str] | None,
        image: str | None = None,
        agent_files: dict[str, str] | None = None,
        allowed_models: list[str] | None = None,
    ) -> SandboxRecord:
        """Create and start a sandbox. `agent_files` (name -> text) are mounted read-only at
        /run/appliance/agent (the policy must list that path in read_only). `allowed_models`:
        the only models its key may use (None: any), set when the key is made, before the
        sandbox runs.

        All or nothing: the name is checked before anything is written, and a failure at any
        step undoes what this call made (record, revision, directories, key, proxy, container);
        a home kept by `rm --keep-home` stays."""
        check_name(name, "sandbox")
        self._refuse_if_held()
        paths = self.paths(name)
        image = image or "localhost/appliance-base:latest"
        command = command or ["sleep", "infinity"]
        with Undo(f"sandbox {name}") as undo:
            if not self.boxes.claim(name, image=image, command=command):
                raise SandboxError(
                    f"sandbox {name!r} exists", hint=f"`appliance sandbox rm {name}`"
                )
            undo.add(self.boxes.delete, name)
            undo.add(self.store_audit, "sandbox.create_undone", sandbox=name)
            policy = self._carry_over_network(name, policy)
            rev = self.boxes.add_revision(name, policy, "created")
            undo.add(self.boxes.delete_revision, name, rev)
            undo_new_dirs(undo, [paths.home, paths.private, paths.root], paths.private.parent)
            self._prepare_dirs(paths, policy, command)
            if agent_files is not None:
                self._write_agent_files(paths, agent_files)
            key_id = self._new_key(name, paths, allowed_models)
            undo.add(discard_key, self.config.state_dir, key_id)
            self.boxes.upsert(name, image=image, command=command, state="creating", key_id=key_id)
            self.store_audit("sandbox.create", sandbox=name, policy_rev=rev)
            self._create_container(undo, name, policy, image, command, paths, agent_files)
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
    ) -> None:
        """The proxy and the container, each registered in `undo` as soon as it exists."""
        proxy = self._spawn_proxy(name, paths)
        if proxy is not None:
            undo.add(end_proxy, proxy, paths.proxy_pid)
        client = self._client()
        mounts = SandboxMounts(
            egress_dir=str(paths.egress),
            supervisor_dir=str(paths.root.parent / "supervisor"),
            config_dir=str(paths.config),
            report_dir=str(paths.report),
            seccomp_path=str(paths.seccomp),
            state_dir=str(paths.home) if "/home/agent" in policy.filesystem.read_write else None,
            agent_dir=str(paths.agent) if agent_files is not None else None,
        )
        spec = podman_spec(policy, name=name, image=image, mounts=mounts, command=command)
        spec["labels"][STATE_LABEL] = self.instance
        try:
            container = client.containers.create(**spec)
        except Exception as exc:  # podman-py's APIError: say what the operator can do
            if "already in use" not in str(exc):
                raise
            raise SandboxError(
                f"Podman already has a container named {name!r} that this appliance did "
                "not create (another state dir, or made by hand)",
                hint=f"pick another name, or remove it: podman rm -f {name} (as the "
                f"{self.config.sandbox.service_user} user)",
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

    def _prepare_dirs(self, paths: SandboxPaths, policy: Policy, command: list[str]) -> None:
        acct = self.podman.account
        agent = _mapped_uid(acct.pw_name, policy.process.uid)
        agent_gid = agent - policy.process.uid + policy.process.gid  # same offset for subgid
        sandboxes = paths.root.parent
        sandboxes.mkdir(mode=0o755, exist_ok=True)
        supervisor = sandboxes / "supervisor"
        supervisor.mkdir(mode=0o755, exist_ok=True)
        for src in SUPERVISOR_SRC.glob("*.py"):
            shutil.copyfile(src, supervisor / src.name)
            (supervisor / src.name).chmod(0o644)
        for d in (paths.root, paths.egress, paths.config):
            d.mkdir(mode=0o755, parents=True, exist_ok=True)
        for d in (paths.report, paths.home):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chown(d, agent, agent_gid)
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
        }  # fmt: skip
        (paths.config / "sandbox.json").write_text(json.dumps(sandbox_json, indent=1))
        (paths.config / "sandbox.json").chmod(0o644)
        (paths.report / "enforcement.json").unlink(missing_ok=True)

    def _write_agent_files(self, paths: SandboxPaths, files: dict[str, str]) -> None:
        remove_owned(paths.root, paths.agent)  # nothing stale from an earlier version
        paths.agent.mkdir(mode=0o755, parents=True)
        for filename, text in files.items():
            target = paths.agent / filename
            target.write_text(text)
            target.chmod(0o644)  # root-owned: the agent reads, never writes

    def _new_key(self, name: str, paths: SandboxPaths, allowed_models: list[str] | None) -> str:
        inference = InferenceStore(self.config.state_dir)
        try:
            inference.revoke_key(f"sandbox-{name}")  # a re-created sandbox gets a fresh key
            record, secret = inference.create_key(f"sandbox-{name}", "sandbox", allowed_models)
        finally:
            inference.close()
        fd = os.open(paths.key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secret + "\n")
        return record.id

    # -- the egress proxy process ------------------------------------------------------------

    def _proxy_running(self, paths: SandboxPaths) -> int | None:
        """The proxy's pid if it is alive: not a zombie, and not a reused pid."""
        try:
            pid = int(paths.proxy_pid.read_text())
        except (OSError, ValueError):
            return None
        with contextlib.suppress(ChildProcessError):  # ours when this process started it
            os.waitpid(pid, os.WNOHANG)
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()  # empty for a zombie
        except OSError:
            return None
        return pid if os.fsencode(paths.admin_socket) in cmdline else None

    def _start_proxy(self, name: str, paths: SandboxPaths) -> None:
        self._await_proxy(name, paths, self._spawn_proxy(name, paths))

    def _spawn_proxy(self, name: str, paths: SandboxPaths) -> subprocess.Popen[bytes] | None:
        """Bind the egress socket here, then start the proxy on it without waiting (it takes
        ~0.3 s to start: a sandbox starting meanwhile waits in the listen backlog, no failure).
        None when a proxy already runs."""
        if self._proxy_running(paths):
            return None
        egress = paths.egress / "egress.sock"
        for sock_path in (paths.admin_socket, egress):
            if len(os.fsencode(sock_path)) > UNIX_PATH_MAX:
                raise SandboxError(
                    f"{sock_path} is too long for a unix socket ({UNIX_PATH_MAX} bytes at most)",
                    hint="use a shorter state_dir (or sandbox name)",
                )
        egress.unlink(missing_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        gw = self.config.gateway
        try:
            listener.bind(str(egress))
            egress.chmod(0o666)  # the agent is a subuid; the directory's bind mount guards it
            listener.listen(128)
            argv = [
                sys.executable, "-m", "appliance.egress_main",  # the proxy, auditing to the chain
                "--sandbox", name,
                "--socket", str(egress),
                "--socket-fd", str(listener.fileno()),
                "--policy", str(paths.policy),
                "--admin-socket", str(paths.admin_socket),
                "--gateway-url", f"http://{gw.host}:{gw.port}",
                "--key-file", str(paths.key),
                "--audit-log", str(audit_path(self.config.state_dir)),
                # the proxy itself runs as this user, with no capabilities (egress_main.py)
                "--proxy-user", self.config.sandbox.proxy_user,
                "--max-pending", str(self.config.sandbox.max_pending_approvals),
            ]  # fmt: skip
            with paths.proxy_log.open("ab") as log:
                proc = subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log,
                    start_new_session=True, pass_fds=(listener.fileno(),),
                )  # fmt: skip
        finally:
            listener.close()  # the proxy has its own copy
        paths.proxy_pid.write_text(f"{proc.pid}\n")
        return proc

    def _await_proxy(
        self, name: str, paths: SandboxPaths, proc: subprocess.Popen[bytes] | None
    ) -> None:
        if proc is None:
            return
        assert proc.stdout is not None
        line = proc.stdout.readline().decode(errors="replace")  # "ready <socket>" once serving
        if not line.startswith("ready"):
            paths.proxy_pid.unlink(missing_ok=True)
            raise SandboxError(f"egress proxy for {name} did not start: {line.strip()!r}")

    def _stop_proxy(self, paths: SandboxPaths) -> None:
        pid = self._proxy_running(paths)
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
        paths.proxy_pid.unlink(missing_ok=True)

    # -- container state ---------------------------------------------------------------------

    def _start_container(self, name: str, container: Any) -> dict[str, Any]:
        paths = self.paths(name)
        (paths.report / "enforcement.json").unlink(missing_ok=True)
        container.start()
        report = self._wait_report(paths, container)
        self.boxes.set_state(name, "running")
        self.store_audit("sandbox.start", sandbox=name, landlock_abi=report["landlock"]["abi"])
        return report

    def _wait_report(self, paths: SandboxPaths, container: Any) -> dict[str, Any]:
        deadline = time.monotonic() + REPORT_TIMEOUT_S
        report_file = paths.report / "enforcement.json"
        polls = 0
        while time.monotonic() < deadline:
            if report_file.is_file():
                report = json.loads(report_file.read_text())
                if not report.get("agent_started"):
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
        try:
            self.container(name).remove(force=True)
        except Exception as exc:  # already gone from Podman: still forget it here
            if "no such container" not in str(exc).lower():
                raise
        self._stop_proxy(paths)
        inference = InferenceStore(self.config.state_dir)
        try:
            if record.key_id:
                inference.revoke_key(record.key_id)
        finally:
            inference.close()
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
                live[c.labels[SANDBOX_LABEL]] = _listed_status(c)
        except ApplianceError:
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
            raise NotFoundError(f"no policy for sandbox {name!r}")
        return latest

    def set_policy(self, name: str, new: Policy) -> int:
        """Hot-reload the network part; the static part is fixed at creation."""
        _rev, current = self.policy(name)
        if policy_digest(new) != policy_digest(current):
            raise SandboxError(
                "only `network` can change on a running sandbox; the static part is fixed",
                hint=f"re-create it: `appliance sandbox rm {name}` then `sandbox create`",
            )
        return self.apply_network(name, new.network, "policy set")

    def apply_network(self, name: str, network: Network, reason: str) -> int:
        rev = self.boxes.set_network(name, network, reason)
        paths = self.paths(name)
        paths.policy.write_text(self.policy(name)[1].to_yaml())
        if (pid := self._proxy_running(paths)) is not None:
            os.kill(pid, signal.SIGHUP)  # the proxy re-reads its policy file
        self.store_audit("policy.revision", sandbox=name, rev=rev, reason=reason)
        return rev

    def sync_policy_from_proxy(self, name: str, reason: str) -> int:
        """After a persisted approval the proxy rewrote its file: make that a store revision."""
        network = read_policy_file(self.paths(name).policy).network
        return self.apply_network(name, network, reason)

    # -- kill switch -------------------------------------------------------------------------

    def kill(self, names: list[str], hold: bool, reason: str) -> list[str]:
        """Stop the named sandboxes at once (in parallel: the switch must finish within 5 s)."""
        if hold:
            self.boxes.hold(reason)
        records = [r for n in names if (r := self.boxes.get(n)) is not None]
        errors = self._stop_containers([r.container_id or r.name for r in records])
        stopped: list[str] = []
        failed = [f"{n}: no such sandbox" for n in names if self.boxes.get(n) is None]
        for record, error in zip(records, errors, strict=True):
            self._stop_proxy(self.paths(record.name))  # no egress even if the stop failed
            if error is None:
                self.boxes.set_state(record.name, "stopped")
                stopped.append(record.name)
            else:
                failed.append(f"{record.name}: {error}")
        self.store_audit("kill", sandboxes=stopped, failed=failed, hold=hold, reason=reason)
        if failed:
            raise SandboxError("the kill switch could not stop " + "; ".join(failed))
        return stopped

    def _stop_containers(self, ids: list[str]) -> list[str | None]:
        """SIGTERM, then SIGKILL after STOP_TIMEOUT_S, for all at once; an error per id or None."""
        if not ids:
            return []
        self._client()  # the service must be up before the threads connect

        def stop(container_id: str) -> str | None:
            try:  # a client per thread: podman-py's requests session is not thread-safe
                with self.podman.client() as client:
                    client.containers.get(container_id).stop(timeout=STOP_TIMEOUT_S)
            except Exception as exc:
                if "no such container" not in str(exc).lower():
                    return str(exc)
            return None

        with ThreadPoolExecutor(max_workers=min(16, len(ids))) as pool:
            return list(pool.map(stop, ids))

    # -- reconciliation ----------------------------------------------------------------------

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
            elif _listed_status(container) == "running":
                if self._proxy_running(paths) is None:
                    self._start_proxy(record.name, paths)
                    out.proxies_restarted.append(record.name)
                if record.state != "running":
                    self.boxes.set_state(record.name, "running", container.id)
                out.running.append(record.name)
            elif record.state == "running" and not held:
                try:
                    self._start_proxy(record.name, paths)
                    self._start_container(record.name, container)
                    out.restarted.append(record.name)
                except ApplianceError as exc:
                    self.boxes.set_state(record.name, "failed")
                    out.failed.append(f"{record.name}: {exc}")
            else:
                self._stop_proxy(paths)
                if record.state not in ("stopped", "failed"):
                    self.boxes.set_state(record.name, "stopped")
                out.stopped.append(record.name)
        out.orphans = sorted(on_podman)
        if out.changed:
            self.store_audit("sandbox.reconcile", **out.as_dict())
        return out

    def store_audit(self, event: str, **fields: Any) -> None:
        inference = InferenceStore(self.config.state_dir)
        try:
            inference.audit(event, **fields)
        finally:
            inference.close()


def ensure_ready(config: ApplianceConfig) -> None:
    """Fail early, with the fix, when this host cannot run sandboxes at all."""
    if shutil.which("podman") is None:
        raise PreflightError("podman is not installed", hint="run scripts/setup.sh as root")
    if os.geteuid() != 0:
        raise BackendError("sandboxes are managed by root (the control plane)", hint="use sudo")
