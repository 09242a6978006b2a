"""Policy -> the keyword arguments of podman-py's `containers.create(**spec)`, as plain data.

Three podman-py 5.x translations shape the spec (see `podman/domain/containers_create.py`):
- `security_opt` becomes SELinux options there, so no-new-privileges and the seccomp profile go
  through podman-py's own `no_new_privileges` and `seccomp_profile_path` keys;
- `nano_cpus` is silently dropped, so the CPU limit is `cpu_period`/`cpu_quota`;
- the `tmpfs` keyword is refused, so tmpfs mounts are `mounts` entries of type tmpfs.

Writable paths are tmpfs without `noexec` (Podman's default for tmpfs): agents run what they
write (npm's node_modules/.bin, scripts in /tmp, native addons mmapped executable). Landlock, not
the mount flag, decides who may execute what; nosuid and nodev are Podman's tmpfs defaults.
Each tmpfs is capped at half the memory limit: tmpfs pages are charged to the container's memory
cgroup, so a full disk must show up as ENOSPC before the OOM killer picks a process.

Memory and pids are limited twice. The cgroup limits (`mem_limit`, `pids_limit`) cap the whole
sandbox, but rootless Podman can only apply them on cgroup v2 with controller delegation; on a
cgroup v1 host it silently drops them. The rlimits hold everywhere: RLIMIT_DATA (the heap and
every private writable mapping) caps each process at `resources.process_memory` (default: the
memory limit; Node needs more, see sandbox/policy.py), and RLIMIT_NPROC the process count.
The supervisor reports which of the two are in force.

`podman_argv(spec)` renders the same spec as a `podman create` command line for debugging.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from sandbox.policy import Policy

HOME = "/home/agent"
EGRESS_DIR = "/run/appliance/egress"
SUPERVISOR_DIR = "/opt/appliance/supervisor"
CONFIG_DIR = "/run/appliance/config"
REPORT_DIR = "/run/appliance/report"
AGENT_DIR = "/run/appliance/agent"  # the agent's rendered config: readable, never writable
SOCK_DIR = "/run/appliance/sock"  # PID 1's agent socket, forwarded to the runtime's loopback port
SUPERVISOR_ENTRYPOINT = ["/usr/bin/python3", "-I", f"{SUPERVISOR_DIR}/init.py"]
PROXY_URL = "http://127.0.0.1:3128"
NOFILE = 1024  # the host's hard RLIMIT_NOFILE cannot be raised (no CAP_SYS_RESOURCE)
NPROC_MAX = 1000  # an nproc at the host's hard limit fails with EPERM; 1000 was measured to work
CPU_PERIOD = 100_000  # microseconds


@dataclass(frozen=True)
class SandboxMounts:
    """Host paths that the lifecycle prepares for one sandbox."""

    egress_dir: str  # holds the sandbox's egress unix socket
    supervisor_dir: str  # the stdlib-only supervisor (init.py)
    config_dir: str  # sandbox.json: Landlock rules and command
    report_dir: str  # the supervisor's enforcement report (writable)
    seccomp_path: str  # the profile from sandbox.compile.seccomp, as a file
    state_dir: str | None = None  # persistent agent home; needs HOME in policy read_write
    agent_dir: str | None = None  # rendered agent config; needs AGENT_DIR in policy read_only
    sock_dir: str | None = None  # a runtime service's agent socket (the host connects to it)


def policy_digest(policy: Policy) -> str:
    """sha256 of the static part: a changed digest means the sandbox must be re-created."""
    canonical = json.dumps(policy.static_part(), sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _bind(source: str, target: str, *, read_only: bool) -> dict[str, Any]:
    return {"type": "bind", "source": source, "target": target, "read_only": read_only}


def _tmpfs(target: str, size: int) -> dict[str, Any]:
    # podman-py passes only size/mode and the *value* of `propagation` through to the mount
    # options; "exec" rides in that slot to override Podman's tmpfs noexec default (see above).
    return {
        "type": "tmpfs",
        "source": "tmpfs",
        "target": target,
        "size": size,
        "mode": "1777",  # the agent is not root and must write; sticky as /tmp is
        "propagation": "exec",
    }


def _environment() -> dict[str, str]:
    # Non-secret values only: the real inference key is injected by the host-side proxy.
    return {
        "HOME": HOME,
        "HTTP_PROXY": PROXY_URL,
        "HTTPS_PROXY": PROXY_URL,
        "http_proxy": PROXY_URL,
        "https_proxy": PROXY_URL,
        "ALL_PROXY": PROXY_URL,
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
        "NODE_USE_ENV_PROXY": "1",  # Node >= 24 honours HTTP(S)_PROXY only with this
    }


def podman_spec(
    policy: Policy,
    *,
    name: str,
    image: str,
    mounts: SandboxMounts,
    command: list[str] | None,
) -> dict[str, Any]:
    writable = policy.filesystem.read_write
    if mounts.state_dir is not None and HOME not in writable:
        raise ValueError(f"a state volume needs {HOME} in filesystem.read_write")
    res = policy.resources
    tmpfs_size = res.memory // 2

    mount_list = [
        _bind(mounts.supervisor_dir, SUPERVISOR_DIR, read_only=True),
        _bind(mounts.config_dir, CONFIG_DIR, read_only=True),
        _bind(mounts.egress_dir, EGRESS_DIR, read_only=True),  # connect() needs no write
        _bind(mounts.report_dir, REPORT_DIR, read_only=False),  # Landlock keeps the agent out
    ]
    if mounts.agent_dir is not None:
        if AGENT_DIR not in policy.filesystem.read_only:
            raise ValueError(f"an agent config dir needs {AGENT_DIR} in filesystem.read_only")
        mount_list.append(_bind(mounts.agent_dir, AGENT_DIR, read_only=True))
    if mounts.sock_dir is not None:  # PID 1 binds there; Landlock keeps the agent out
        mount_list.append(_bind(mounts.sock_dir, SOCK_DIR, read_only=False))
    for path in sorted(writable):
        if path == HOME and mounts.state_dir is not None:
            mount_list.append(_bind(mounts.state_dir, HOME, read_only=False))
        else:
            mount_list.append(_tmpfs(path, tmpfs_size))

    spec: dict[str, Any] = {
        "name": name,
        "image": image,
        "hostname": name,
        "user": f"{policy.process.uid}:{policy.process.gid}",  # never root, not even PID 1
        "entrypoint": list(SUPERVISOR_ENTRYPOINT),
        "environment": _environment(),
        "labels": {"appliance.sandbox": name, "appliance.policy-digest": policy_digest(policy)},
        "network_mode": "none",  # egress only through the bind-mounted unix socket
        "ipc_mode": "private",
        "read_only": True,
        # No automatic /tmp, /var/tmp, /run tmpfs (rootless Podman adds them with read_only):
        # only the policy's read_write paths become writable.
        "read_write_tmpfs": False,
        "mounts": mount_list,
        "cap_drop": ["ALL"],
        "privileged": False,
        "no_new_privileges": True,
        "seccomp_profile_path": mounts.seccomp_path,
        "init": False,  # the supervisor is PID 1 and reaps
        "mem_limit": res.memory,
        "memswap_limit": res.memory,  # no swap on top
        "pids_limit": res.pids,
        "cpu_period": CPU_PERIOD,
        "cpu_quota": round(res.cpus * CPU_PERIOD),
        "ulimits": [
            {"Name": "nofile", "Soft": NOFILE, "Hard": NOFILE},
            # RLIMIT_NPROC counts per uid across every sandbox sharing the rootless user
            # namespace; pids_limit is the per-sandbox cap, nproc the fallback where cgroup
            # limits are unavailable (rootless on cgroup v1).
            {
                "Name": "nproc",
                "Soft": min(res.pids, NPROC_MAX),
                "Hard": min(res.pids, NPROC_MAX),
            },
            {"Name": "data", "Soft": res.data_limit, "Hard": res.data_limit},
            {"Name": "core", "Soft": 0, "Hard": 0},  # no core dumps with secrets in them
        ],
    }
    if command is not None:
        spec["command"] = list(command)
    return spec


def _mount_arg(mount: dict[str, Any]) -> str:
    if mount["type"] == "bind":
        ro = ",ro" if mount["read_only"] else ""
        return f"type=bind,source={mount['source']},destination={mount['target']}{ro}"
    return (
        f"type=tmpfs,destination={mount['target']},tmpfs-size={mount['size']},"
        f"tmpfs-mode={mount['mode']},{mount['propagation']}"
    )


def podman_argv(spec: dict[str, Any]) -> list[str]:
    """The `podman create` command line equivalent to `spec` (for debugging and docs)."""
    argv = ["podman", "create", f"--name={spec['name']}", f"--hostname={spec['hostname']}"]
    argv.append(f"--user={spec['user']}")
    argv.append(f"--network={spec['network_mode']}")
    argv.append(f"--ipc={spec['ipc_mode']}")
    argv.append(f"--read-only={str(spec['read_only']).lower()}")
    argv.append(f"--read-only-tmpfs={str(spec['read_write_tmpfs']).lower()}")
    argv += [f"--cap-drop={cap}" for cap in spec["cap_drop"]]
    if spec["no_new_privileges"]:
        argv.append("--security-opt=no-new-privileges")
    argv.append(f"--security-opt=seccomp={spec['seccomp_profile_path']}")
    argv.append(f"--init={str(spec['init']).lower()}")
    argv.append(f"--memory={spec['mem_limit']}")
    argv.append(f"--memory-swap={spec['memswap_limit']}")
    argv.append(f"--pids-limit={spec['pids_limit']}")
    argv.append(f"--cpu-period={spec['cpu_period']}")
    argv.append(f"--cpu-quota={spec['cpu_quota']}")
    argv += [f"--ulimit={u['Name']}={u['Soft']}:{u['Hard']}" for u in spec["ulimits"]]
    argv += [f"--mount={_mount_arg(m)}" for m in spec["mounts"]]
    argv += [f"--env={k}={v}" for k, v in spec["environment"].items()]
    argv += [f"--label={k}={v}" for k, v in spec["labels"].items()]
    argv.append(f"--entrypoint={json.dumps(spec['entrypoint'])}")
    argv.append(spec["image"])
    argv += spec.get("command", [])
    return argv
