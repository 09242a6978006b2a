"""Policy -> seccomp profile (the Docker/Podman JSON format that `podman --security-opt seccomp=`
reads and converts for runc).

Shape: allow-list. Default action EPERM; an allow list derived from Podman's default profile
(`sandbox/data/seccomp_base.json`); conditional allows for `clone`, `socket`, `execveat` and
`personality`; `clone3` answers ENOSYS so libc falls back to `clone`, whose flags we can inspect;
then explicit EPERM entries for everything in DENY (each with its reason) and the policy's extra
denies. An explicit EPERM entry equals the default action, which runc skips as redundant: the
entries are there so that a denied name can never also sit in the allow list, and so the profile
documents itself. A name the kernel or libseccomp does not know is skipped by the runtime.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

from sandbox.policy import Policy

EPERM = 1
ENOSYS = 38

# clone(2) flags that create namespaces (CLONE_NEWTIME, 0x80, only exists for clone3/unshare).
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
CLONE_NS_MASK = (
    CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWUSER | CLONE_NEWPID
) | CLONE_NEWNET

AF_UNIX, AF_INET, AF_INET6, AF_NETLINK = 1, 2, 10, 16
NETLINK_ROUTE = 0
SOCK_TYPE_MASK = 0xF  # the low bits of socket()'s type; the rest are SOCK_NONBLOCK/SOCK_CLOEXEC
SOCK_STREAM, SOCK_DGRAM = 1, 2  # INET/INET6 get these two only: no SOCK_RAW (3), no SCTP
AT_EMPTY_PATH = 0x1000
# personality(2) values Podman's default allows: PER_LINUX, PER_LINUX32, UNAME26 variants, query.
PERSONALITY_ALLOWED = (0x0, 0x8, 0x20000, 0x20008, 0xFFFFFFFF)

# Syscalls denied outright (EPERM), each with why. At least what OpenShell blocks, plus what
# Podman's default leaves open that an agent never needs.
DENY: dict[str, str] = {
    "ptrace": "inspect/modify other processes (the supervisor runs as the same uid)",
    "process_vm_readv": "read another process's memory",
    "process_vm_writev": "write another process's memory",
    "pidfd_open": "handles on other processes (pidfd_getfd steals their fds)",
    "pidfd_getfd": "copy a file descriptor out of another process",
    "pidfd_send_signal": "signal processes through pidfds",
    "kcmp": "compare kernel objects of other processes",
    "bpf": "load eBPF programs; large kernel attack surface",
    "perf_event_open": "performance counters: side channels and kernel attack surface",
    "userfaultfd": "stalls kernel page faults; a classic exploitation primitive",
    "memfd_create": "anonymous executable files that bypass Landlock and noexec",
    "memfd_secret": "memory hidden from the kernel's own inspection",
    "io_uring_setup": "io_uring bypasses seccomp for the operations it submits",
    "io_uring_enter": "io_uring bypasses seccomp for the operations it submits",
    "io_uring_register": "io_uring bypasses seccomp for the operations it submits",
    "mount": "mount family: change the filesystem view",
    "umount": "mount family",
    "umount2": "mount family",
    "fsopen": "new mount API",
    "fsconfig": "new mount API",
    "fsmount": "new mount API",
    "fspick": "new mount API",
    "move_mount": "new mount API",
    "open_tree": "new mount API: clone a mount tree",
    "mount_setattr": "new mount API: change mount flags",
    "pivot_root": "change the root filesystem",
    "chroot": "change the root directory",
    "setns": "join another namespace",
    "unshare": "create namespaces (user namespaces reopen the kernel's privileged paths)",
    "keyctl": "kernel keyring: not namespaced, shared with the host",
    "add_key": "kernel keyring",
    "request_key": "kernel keyring",
    "kexec_load": "replace the running kernel",
    "kexec_file_load": "replace the running kernel",
    "init_module": "load kernel modules",
    "finit_module": "load kernel modules",
    "delete_module": "unload kernel modules",
    "open_by_handle_at": "open files by handle, around path-based checks (the shocker escape)",
    "name_to_handle_at": "file handles: pairs with open_by_handle_at",
    "quotactl": "filesystem quotas of the host",
    "quotactl_fd": "filesystem quotas of the host",
    "acct": "process accounting to a file",
    "swapon": "host swap",
    "swapoff": "host swap",
    "reboot": "reboot the host",
    "syslog": "kernel log: leaks kernel addresses",
    "lookup_dcookie": "kernel profiling internals",
    "uselib": "obsolete library loader",
    "vhangup": "hang up terminals",
    "settimeofday": "set the host clock",
    "clock_settime": "set the host clock",
    "stime": "set the host clock",
    "sethostname": "UTS names are fixed by the sandbox",
    "setdomainname": "UTS names are fixed by the sandbox",
    "iopl": "raw I/O port access",
    "ioperm": "raw I/O port access",
    "nfsservctl": "kernel NFS server",
    "fanotify_init": "filesystem-wide event monitoring",
}


@cache
def _base() -> dict[str, Any]:
    text = resources.files("sandbox").joinpath("data/seccomp_base.json").read_text("utf-8")
    return json.loads(text)


def _arg(index: int, value: int, op: str = "SCMP_CMP_EQ", value_two: int = 0) -> dict[str, Any]:
    return {"index": index, "value": value, "valueTwo": value_two, "op": op}


def _rule(names: list[str], action: str, comment: str, **extra: Any) -> dict[str, Any]:
    return {"names": names, "action": action, **extra, "comment": comment}


def _conditional_allows() -> list[dict[str, Any]]:
    allow = "SCMP_ACT_ALLOW"
    rules = [
        _rule(
            ["clone"],
            allow,
            "threads and fork only: no CLONE_NEW* namespace flags",
            args=[_arg(0, CLONE_NS_MASK, "SCMP_CMP_MASKED_EQ", 0)],
        ),
        _rule(["socket"], allow, "AF_UNIX, any type", args=[_arg(0, AF_UNIX)]),
    ]
    for family, fname in ((AF_INET, "AF_INET"), (AF_INET6, "AF_INET6")):
        for sock_type, tname in ((SOCK_STREAM, "SOCK_STREAM"), (SOCK_DGRAM, "SOCK_DGRAM")):
            rules.append(
                _rule(
                    ["socket"],
                    allow,
                    f"{fname} {tname} (no SOCK_RAW)",
                    args=[
                        _arg(0, family),
                        _arg(1, SOCK_TYPE_MASK, "SCMP_CMP_MASKED_EQ", sock_type),
                    ],
                )
            )
    rules.append(
        _rule(
            ["socket"],
            allow,
            "AF_NETLINK with NETLINK_ROUTE only (interface listing)",
            args=[_arg(0, AF_NETLINK), _arg(2, NETLINK_ROUTE)],
        )
    )
    rules.append(
        _rule(
            ["execveat"],
            allow,
            "without AT_EMPTY_PATH (exec of an fd: the memfd-exec path)",
            args=[_arg(4, AT_EMPTY_PATH, "SCMP_CMP_MASKED_EQ", 0)],
        )
    )
    for value in PERSONALITY_ALLOWED:
        rules.append(
            _rule(["personality"], allow, "default persona values only", args=[_arg(0, value)])
        )
    return rules


def denied_syscalls(policy: Policy) -> list[str]:
    """Every name the profile refuses outright: the built-in list plus the policy's extras."""
    return sorted(set(DENY) | set(policy.syscalls.deny))


def seccomp_profile(policy: Policy) -> dict[str, Any]:
    base = _base()
    denied = set(denied_syscalls(policy))
    # A policy may deny a syscall that the base or a conditional rule allows: drop the allow.
    allowed = sorted(set(base["allow"]) - denied)
    syscalls: list[dict[str, Any]] = [
        _rule(allowed, "SCMP_ACT_ALLOW", "base allow list (Podman default, trimmed)")
    ]
    syscalls += [r for r in _conditional_allows() if r["names"][0] not in denied]
    if "clone3" not in denied:
        syscalls.append(
            _rule(
                ["clone3"],
                "SCMP_ACT_ERRNO",
                "ENOSYS: its flags sit in memory seccomp cannot read; libc falls back to clone",
                errnoRet=ENOSYS,
            )
        )
    for name in sorted(denied):
        reason = DENY.get(name, "denied by the sandbox policy")
        syscalls.append(_rule([name], "SCMP_ACT_ERRNO", reason, errnoRet=EPERM))
    return {
        "defaultAction": base["defaultAction"],
        "defaultErrnoRet": base["defaultErrnoRet"],
        "archMap": base["archMap"],
        "syscalls": syscalls,
    }
