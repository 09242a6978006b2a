"""The enforcement report (/run/appliance/report/enforcement.json) that the host reads: what
PID 1 and the agent run under, measured from inside, and (for an always-on runtime) its state."""

from __future__ import annotations

import json
import os
import resource
import time
from typing import Any

import landlock
from log import EXIT_CONFIG, die

PR_GET_DUMPABLE = 3
STATUS_KEYS = ("Uid", "NoNewPrivs", "Seccomp", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")


def utc(at: float | None = None) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))


def proc_status(raw: bytes) -> dict[str, str]:
    out = {}
    for line in raw.decode(errors="replace").splitlines():
        key, _, value = line.partition(":")
        if key in STATUS_KEYS:
            out[key] = value.strip()
    return out


def write_report(path: str, report: dict[str, Any]) -> None:
    """Atomic: temp file in the same directory, fsync, rename."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:  # no report, no agent: the host would not know what is enforced
        die(EXIT_CONFIG, f"cannot write the enforcement report {path}: {exc}")


def _cgroup_limit(*paths: str) -> int | None:
    """The first readable cgroup limit among v2/v1 paths; None when unlimited or not visible."""
    for path in paths:
        try:
            with open(path) as f:
                raw = f.read().strip()
        except OSError:
            continue
        if raw == "max" or not raw.isdigit() or int(raw) >= 1 << 62:  # v1 "unlimited" is huge
            return None
        return int(raw)
    return None


def resource_limits() -> dict[str, Any]:
    """What caps this sandbox really has: rootless Podman drops cgroup limits on cgroup v1."""
    return {
        "cgroup_memory": _cgroup_limit(
            "/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"
        ),
        "cgroup_pids": _cgroup_limit("/sys/fs/cgroup/pids.max", "/sys/fs/cgroup/pids/pids.max"),
        "rlimit_data": resource.getrlimit(resource.RLIMIT_DATA)[1],
        "rlimit_nproc": resource.getrlimit(resource.RLIMIT_NPROC)[1],
    }


def base_report(cfg: dict[str, Any], abi: int) -> dict[str, Any]:
    with open("/proc/self/status", "rb") as f:
        own = proc_status(f.read())
    return {
        "started_at": utc(),
        "pid1_uid": os.getuid(),
        "pid1_dumpable": landlock.prctl(PR_GET_DUMPABLE),
        "pid1_seccomp_mode": int(own.get("Seccomp", "0")),
        "compatibility": cfg["landlock"]["compatibility"],
        "min_abi": cfg["landlock"]["min_abi"],
        "agent_started": False,
        "agent_uid": None,
        "landlock": {"abi": abi, "enforced": False},
        "limits": resource_limits(),
    }


def agent_fields(msg: dict[str, Any]) -> dict[str, Any]:
    """What a started agent reported about itself (see spawn.agent_child), as report keys."""
    status = msg["status"]
    return {
        "landlock": msg["landlock"],
        "agent_uid": msg["uid"],
        "no_new_privs": int(status.get("NoNewPrivs", "0")),
        "seccomp_mode": int(status.get("Seccomp", "0")),
        "cap_eff": status.get("CapEff"),
        "cap_bnd": status.get("CapBnd"),
        "cap_prm": status.get("CapPrm"),
        "cap_inh": status.get("CapInh"),
        "cap_amb": status.get("CapAmb"),
    }
