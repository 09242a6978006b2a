"""Policy -> the Landlock rule set that the in-sandbox supervisor applies before it execs the agent.

The JSON (written into sandbox.json as "landlock"; the rights and the ABI that introduced each
come from the supervisor's own table, sandbox/supervisor/landlock.py, which is stdlib-only)::

    {
      "version": 1,
      "compatibility": "hard_requirement" | "best_effort",
      "abi": 7,              # the ABI these rules were compiled for
      "min_abi": 6,          # refuse to start the agent if the kernel's ABI is lower
                             # (hard_requirement: the lowest ABI that handles every right used;
                             #  best_effort: 0, i.e. run anyway and report what is missing)
      "handled": {           # what the ruleset handles (denied unless a rule below allows it)
        "fs": ["execute", "write_file", ...],     # -> handled_access_fs
        "net": ["bind_tcp", "connect_tcp"],       # -> handled_access_net (ABI >= 4)
        "scope": ["abstract_unix_socket", "signal"]  # -> scoped (ABI >= 6)
      },
      "file_rights": ["execute", "write_file", "read_file", "truncate", "ioctl_dev"],
      "fs": [                # one LANDLOCK_RULE_PATH_BENEATH per entry
        {"path": "/usr", "access": ["execute", "read_file", "read_dir"], "optional": true},
        ...
      ],
      "net": {"connect_tcp": [3128], "bind_tcp": [*listen]},  # a NET_PORT rule each
      "missing": []          # rights the newest known ABI has that "abi" lacks
    }

What the supervisor does with it: probe the kernel ABI (landlock_create_ruleset with
LANDLOCK_CREATE_RULESET_VERSION); if it is below "min_abi", fail. Otherwise intersect every
"handled" list and every "access" list with `abi_rights(kernel_abi)` and report
`missing_rights(kernel_abi)` loudly (best_effort only gets this far on an older kernel). Open each
path with O_PATH|O_CLOEXEC; a missing path is skipped when "optional" is true and is an error
otherwise; a path that is not a directory keeps only the rights in "file_rights" (the kernel
rejects directory rights on a file). Rights are Landlock's names without the
LANDLOCK_ACCESS_FS_/LANDLOCK_ACCESS_NET_/LANDLOCK_SCOPE_ prefix, lower case.
"""

from __future__ import annotations

from typing import Any

from sandbox.policy import FORWARDER_PORT, Policy
from sandbox.supervisor.landlock import (
    FILE_RIGHTS,
    FS_RIGHTS,
    LATEST_KNOWN_ABI,
    NET_RIGHTS,
    RIGHT_ABI,
    SCOPES,
    abi_rights,
    missing_rights,
)

READ_EXEC = ("execute", "read_file", "read_dir")
READ = ("read_file", "read_dir")

# What every agent gets besides the policy's paths: as little as a dynamic binary, a shell, Node
# and Python need. Not granted: /opt/appliance (the supervisor), /run/appliance (config, report,
# egress socket: the forwarder outside the domain uses it), /home, /tmp, /var, /root — those come
# only from the policy.
FIXED_PATHS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("/usr", READ_EXEC, "programs and libraries"),
    ("/bin", READ_EXEC, "symlink into /usr on merged-/usr images; a real dir elsewhere"),
    ("/lib", READ_EXEC, "as /bin"),
    ("/lib64", READ_EXEC, "as /bin; the x86_64 dynamic loader path"),
    ("/etc/ld.so.cache", ("read_file",), "dynamic loader cache"),
    ("/etc/ld.so.conf", ("read_file",), "dynamic loader config"),
    ("/etc/ld.so.conf.d", READ, "dynamic loader config"),
    ("/etc/passwd", ("read_file",), "getpwuid: npm, os.userInfo(), getpass"),
    ("/etc/group", ("read_file",), "getgrgid"),
    ("/etc/nsswitch.conf", ("read_file",), "libc name service config"),
    ("/etc/hosts", ("read_file",), "localhost resolution (no DNS in the sandbox)"),
    ("/etc/resolv.conf", ("read_file",), "read by libc resolvers even when unused"),
    ("/etc/host.conf", ("read_file",), "libc resolver config"),
    ("/etc/gai.conf", ("read_file",), "getaddrinfo ordering"),
    ("/etc/localtime", ("read_file",), "time zone"),
    ("/etc/ssl", READ, "CA certificates for TLS through the proxy's CONNECT"),
    ("/etc/ca-certificates", READ, "CA certificate config"),
    ("/dev/null", ("read_file", "write_file"), "redirects"),
    ("/dev/zero", ("read_file",), "zero pages"),
    ("/dev/random", ("read_file",), "entropy"),
    ("/dev/urandom", ("read_file",), "entropy"),
    ("/dev/full", ("read_file", "write_file"), "tests of write errors"),
    # Other processes' /proc entries stay protected: Landlock denies ptrace-mode access to
    # processes outside the domain (the supervisor), whatever these rules say.
    ("/proc", READ, "/proc/self, meminfo, cpuinfo, stat: Node and Python read them"),
    ("/sys/devices/system/cpu", READ, "glibc's CPU count (cpu/online)"),
    ("/sys/fs/cgroup", READ, "cgroup limits: Node sizes its heap by memory.max"),
)


def _keep(names: tuple[str, ...] | list[str], abi: int) -> list[str]:
    known = set(abi_rights(abi))
    return [n for n in RIGHT_ABI if n in names and n in known]  # canonical order


def landlock_rules(policy: Policy, *, abi: int | None = None) -> dict[str, Any]:
    abi = LATEST_KNOWN_ABI if abi is None else abi
    if not 1 <= abi <= LATEST_KNOWN_ABI:
        raise ValueError(f"Landlock ABI {abi} is not one we know (1..{LATEST_KNOWN_ABI})")
    fs_all = [n for n, (_bit, since) in FS_RIGHTS.items() if since <= abi]

    fs: list[dict[str, Any]] = []
    for path, access, _why in FIXED_PATHS:
        fs.append({"path": path, "access": _keep(access, abi), "optional": True})
    # Policy paths are required: a typo must fail the start, not silently grant nothing.
    for path in policy.filesystem.read_only:
        fs.append({"path": path, "access": _keep(READ_EXEC, abi), "optional": False})
    for path in policy.filesystem.read_write:
        fs.append({"path": path, "access": fs_all, "optional": False})

    net_handled = [n for n, (_bit, since) in NET_RIGHTS.items() if since <= abi]
    scope = [n for n, (_bit, since) in SCOPES.items() if since <= abi]
    # The runtime binds its `listen` ports; nothing in the agent's domain may connect to them:
    # the agent's tools would drive their own runtime around the control plane's gate. PID 1's
    # agent-socket forwarder connects from its own domain, which adds that one port (see
    # `own_net` in sandbox/supervisor/init.py). Loopback only: the sandbox has no other interface.
    listen = policy.process.listen
    net = (
        {"connect_tcp": [FORWARDER_PORT], "bind_tcp": list(listen)}
        if net_handled
        else {"connect_tcp": [], "bind_tcp": []}
    )

    used = {r for rule in fs for r in rule["access"]} | set(fs_all) | set(net_handled) | set(scope)
    hard = policy.landlock.compatibility == "hard_requirement"
    return {
        "version": 1,
        "compatibility": policy.landlock.compatibility,
        "abi": abi,
        "min_abi": max(RIGHT_ABI[r] for r in used) if hard else 0,
        "handled": {"fs": fs_all, "net": net_handled, "scope": scope},
        "file_rights": list(FILE_RIGHTS),
        "fs": fs,
        "net": net,
        "missing": missing_rights(abi),
    }
