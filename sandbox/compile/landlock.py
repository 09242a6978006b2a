"""Policy -> the Landlock rule set that the in-sandbox supervisor applies before it execs the agent.

The JSON (written into sandbox.json as "landlock"; the supervisor is stdlib-only, so everything
it needs is spelled out here rather than imported)::

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
      "net": {"connect_tcp": [3128], "bind_tcp": []},  # one LANDLOCK_RULE_NET_PORT per port
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

from sandbox.policy import Policy

LATEST_ABI = 7  # ABI 7 adds audit-log flags only, no new rights
FORWARDER_PORT = 3128  # the supervisor's 127.0.0.1 forwarder to the egress socket

# Right -> the ABI that introduced it, in the kernel's bit order within each kind.
FS_RIGHTS: dict[str, int] = {
    "execute": 1,
    "write_file": 1,
    "read_file": 1,
    "read_dir": 1,
    "remove_dir": 1,
    "remove_file": 1,
    "make_char": 1,
    "make_dir": 1,
    "make_reg": 1,
    "make_sock": 1,
    "make_fifo": 1,
    "make_block": 1,
    "make_sym": 1,
    "refer": 2,
    "truncate": 3,
    "ioctl_dev": 5,
}
NET_RIGHTS: dict[str, int] = {"bind_tcp": 4, "connect_tcp": 4}
SCOPES: dict[str, int] = {"abstract_unix_socket": 6, "signal": 6}
ALL_RIGHTS: dict[str, int] = {**FS_RIGHTS, **NET_RIGHTS, **SCOPES}
FILE_RIGHTS = ("execute", "write_file", "read_file", "truncate", "ioctl_dev")

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


def abi_rights(abi: int) -> list[str]:
    """Every right (fs, net, scope) that a kernel with this Landlock ABI handles."""
    return [name for name, since in ALL_RIGHTS.items() if since <= abi]


def missing_rights(abi: int) -> list[str]:
    """What `best_effort` gives up on this ABI compared with the newest ABI we know."""
    have = set(abi_rights(abi))
    return [name for name in abi_rights(LATEST_ABI) if name not in have]


def _keep(names: tuple[str, ...] | list[str], abi: int) -> list[str]:
    known = set(abi_rights(abi))
    return [n for n in ALL_RIGHTS if n in names and n in known]  # canonical order


def landlock_rules(policy: Policy, *, abi: int | None = None) -> dict[str, Any]:
    abi = LATEST_ABI if abi is None else abi
    if not 1 <= abi <= LATEST_ABI:
        raise ValueError(f"Landlock ABI {abi} is not one we know (1..{LATEST_ABI})")
    fs_all = [n for n in FS_RIGHTS if FS_RIGHTS[n] <= abi]

    fs: list[dict[str, Any]] = []
    for path, access, _why in FIXED_PATHS:
        fs.append({"path": path, "access": _keep(access, abi), "optional": True})
    # Policy paths are required: a typo must fail the start, not silently grant nothing.
    for path in policy.filesystem.read_only:
        fs.append({"path": path, "access": _keep(READ_EXEC, abi), "optional": False})
    for path in policy.filesystem.read_write:
        fs.append({"path": path, "access": fs_all, "optional": False})

    net_handled = [n for n in NET_RIGHTS if NET_RIGHTS[n] <= abi]
    scope = [n for n in SCOPES if SCOPES[n] <= abi]
    net = {"connect_tcp": [FORWARDER_PORT] if net_handled else [], "bind_tcp": []}

    used = {r for rule in fs for r in rule["access"]} | set(fs_all) | set(net_handled) | set(scope)
    hard = policy.landlock.compatibility == "hard_requirement"
    return {
        "version": 1,
        "compatibility": policy.landlock.compatibility,
        "abi": abi,
        "min_abi": max(ALL_RIGHTS[r] for r in used) if hard else 0,
        "handled": {"fs": fs_all, "net": net_handled, "scope": scope},
        "file_rights": list(FILE_RIGHTS),
        "fs": fs,
        "net": net,
        "missing": missing_rights(abi),
    }
