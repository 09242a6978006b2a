"""Landlock through ctypes: the rights table, the ABI probe, ruleset build, restrict_self.

Stdlib only: it lives next to init.py and is mounted read-only with it into the sandbox. It needs
`ctypes`, which Debian ships in libpython3.11-stdlib (not in python3-minimal): the image must carry
that package. The one table of rights and ABIs: the host's rule compiler (sandbox/compile) and
`appliance doctor` import it from here, so what is compiled is what the supervisor applies.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import stat
from dataclasses import dataclass, field

# Syscall numbers are the asm-generic ones: identical on x86_64 and aarch64.
SYS_CREATE_RULESET, SYS_ADD_RULE, SYS_RESTRICT_SELF = 444, 445, 446
CREATE_RULESET_VERSION = 1 << 0
RULE_PATH_BENEATH, RULE_NET_PORT = 1, 2
PR_SET_NO_NEW_PRIVS = 38

# Filesystem rights in bit order, with the ABI that introduced each (kernel uapi landlock.h).
FS_RIGHTS: dict[str, tuple[int, int]] = {
    "execute": (1 << 0, 1),
    "write_file": (1 << 1, 1),
    "read_file": (1 << 2, 1),
    "read_dir": (1 << 3, 1),
    "remove_dir": (1 << 4, 1),
    "remove_file": (1 << 5, 1),
    "make_char": (1 << 6, 1),
    "make_dir": (1 << 7, 1),
    "make_reg": (1 << 8, 1),
    "make_sock": (1 << 9, 1),
    "make_fifo": (1 << 10, 1),
    "make_block": (1 << 11, 1),
    "make_sym": (1 << 12, 1),
    "refer": (1 << 13, 2),
    "truncate": (1 << 14, 3),
    "ioctl_dev": (1 << 15, 5),
}
NET_RIGHTS: dict[str, tuple[int, int]] = {"bind_tcp": (1 << 0, 4), "connect_tcp": (1 << 1, 4)}
SCOPES: dict[str, tuple[int, int]] = {"abstract_unix_socket": (1 << 0, 6), "signal": (1 << 1, 6)}
# Rights that mean something on a non-directory; the kernel rejects the rest (EINVAL) there.
FILE_RIGHTS = ("execute", "write_file", "read_file", "truncate", "ioctl_dev")
LATEST_KNOWN_ABI = 7  # ABI 7 adds audit-log flags only, no new rights
# Every right -> the ABI that introduced it, fs then net then scope (the names are distinct).
RIGHT_ABI: dict[str, int] = {
    name: since
    for table in (FS_RIGHTS, NET_RIGHTS, SCOPES)
    for name, (_bit, since) in table.items()
}


def abi_rights(abi: int) -> list[str]:
    """Every right (fs, net, scope) that a kernel with this Landlock ABI handles."""
    return [name for name, since in RIGHT_ABI.items() if since <= abi]


def missing_rights(abi: int) -> list[str]:
    """What `best_effort` gives up on this ABI compared with the newest ABI we know."""
    have = set(abi_rights(abi))
    return [name for name in abi_rights(LATEST_KNOWN_ABI) if name not in have]


class LandlockError(OSError):
    """A Landlock syscall failed."""


@functools.cache
def _libc() -> ctypes.CDLL:
    # Loaded on first use: the host side imports this module for its tables only.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    libc.prctl.restype = ctypes.c_int
    return libc


def _syscall(*args: int | ctypes.c_void_p | None) -> int:
    conv = [a if a is None or isinstance(a, ctypes.c_void_p) else ctypes.c_long(a) for a in args]
    ret = _libc().syscall(*conv)
    if ret < 0:
        err = ctypes.get_errno()
        raise LandlockError(err, os.strerror(err))
    return int(ret)


def prctl(option: int, arg2: int = 0) -> int:
    """prctl(2) with the unused arguments zeroed; raises OSError on failure."""
    z = ctypes.c_ulong(0)
    ret = _libc().prctl(ctypes.c_int(option), ctypes.c_ulong(arg2), z, z, z)
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(ret)


def abi_version() -> int:
    """The kernel's Landlock ABI; LandlockError (ENOSYS, EOPNOTSUPP, ...) when it has none."""
    return _syscall(SYS_CREATE_RULESET, None, 0, CREATE_RULESET_VERSION)


def probe_abi() -> tuple[int, str]:
    """(ABI version, "") or (0, why) when the kernel has no usable Landlock."""
    try:
        return abi_version(), ""
    except LandlockError as exc:
        why = {errno.ENOSYS: "kernel built without Landlock", errno.EOPNOTSUPP: "Landlock disabled"}
        return 0, why.get(exc.errno or 0, f"landlock_create_ruleset: {exc.strerror}")


def _mask(table: dict[str, tuple[int, int]], names: list[str] | set[str], abi: int) -> int:
    return sum(bit for name, (bit, since) in table.items() if name in names and since <= abi)


def _names(table: dict[str, tuple[int, int]], abi: int) -> list[str]:
    return [name for name, (_bit, since) in table.items() if since <= abi]


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("fs", ctypes.c_uint64), ("net", ctypes.c_uint64), ("scoped", ctypes.c_uint64)]


class _PathBeneath(ctypes.Structure):
    _pack_ = 1  # the uapi struct is __attribute__((packed)): 12 bytes
    _fields_ = [("allowed", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


class _NetPort(ctypes.Structure):
    _fields_ = [("allowed", ctypes.c_uint64), ("port", ctypes.c_uint64)]


@dataclass
class Outcome:
    """What a restriction did; becomes the `landlock` part of the enforcement report."""

    abi: int
    enforced: bool = False
    handled_fs: list[str] = field(default_factory=list)
    handled_net: list[str] = field(default_factory=list)
    handled_scope: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    skipped_paths: list[str] = field(default_factory=list)
    error: str = ""


def restrict(
    abi: int,
    fs_rules: list[dict[str, object]],
    net: dict[str, list[int]],
    scopes: list[str],
) -> Outcome:
    """Handle every right this ABI knows, allow only the rules, restrict the calling thread.

    Must run before any other thread starts: restrict_self applies to the calling thread only.
    """
    out = Outcome(abi=abi)
    out.missing = [f"fs:{n}" for n, (_b, s) in FS_RIGHTS.items() if s > abi]
    out.missing += [f"net:{n}" for n, (_b, s) in NET_RIGHTS.items() if s > abi]
    out.missing += [f"scope:{n}" for n, (_b, s) in SCOPES.items() if s > abi and n in scopes]
    if abi < 1:
        out.error = "Landlock unavailable"
        return out
    attr = _RulesetAttr(
        fs=_mask(FS_RIGHTS, set(FS_RIGHTS), abi),
        net=_mask(NET_RIGHTS, set(NET_RIGHTS), abi),
        scoped=_mask(SCOPES, set(scopes), abi),
    )
    out.handled_fs, out.handled_net = _names(FS_RIGHTS, abi), _names(NET_RIGHTS, abi)
    out.handled_scope = [s for s in _names(SCOPES, abi) if s in scopes]
    # An older kernel rejects a struct with fields it does not know: pass only what it has.
    size = 8 if abi < 4 else 16 if abi < 6 else 24
    ruleset = _syscall(SYS_CREATE_RULESET, ctypes.c_void_p(ctypes.addressof(attr)), size, 0)
    try:
        for rule in fs_rules:
            path, access = str(rule["path"]), list(rule.get("access", []))  # type: ignore[call-overload]
            unknown = [a for a in access if a not in FS_RIGHTS]
            if unknown:
                raise ValueError(f"{path}: unknown access {unknown}")
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError as exc:
                if rule.get("optional") is False:  # a policy path: a typo must not start
                    raise ValueError(f"{path}: named by the policy, but {exc.strerror}") from None
                out.skipped_paths.append(f"{path}: {exc.strerror}")  # less access, no harm
                continue
            try:
                if not stat.S_ISDIR(os.fstat(fd).st_mode):
                    access = [a for a in access if a in FILE_RIGHTS]
                allowed = _mask(FS_RIGHTS, access, abi)
                if allowed:  # an empty mask is ENOMSG, and the path is denied anyway
                    pb = _PathBeneath(allowed=allowed, parent_fd=fd)
                    _syscall(
                        SYS_ADD_RULE,
                        ruleset,
                        RULE_PATH_BENEATH,
                        ctypes.c_void_p(ctypes.addressof(pb)),
                        0,
                    )
            finally:
                os.close(fd)
        if abi >= 4:
            for name in ("bind_tcp", "connect_tcp"):
                for port in net.get(name, []):
                    np_ = _NetPort(allowed=NET_RIGHTS[name][0], port=int(port))
                    _syscall(
                        SYS_ADD_RULE,
                        ruleset,
                        RULE_NET_PORT,
                        ctypes.c_void_p(ctypes.addressof(np_)),
                        0,
                    )
        prctl(PR_SET_NO_NEW_PRIVS, 1)  # restrict_self requires it without CAP_SYS_ADMIN
        _syscall(SYS_RESTRICT_SELF, ruleset, 0)
        out.enforced = True
    except (OSError, ValueError) as exc:
        out.error = str(exc)
    finally:
        os.close(ruleset)
    return out
