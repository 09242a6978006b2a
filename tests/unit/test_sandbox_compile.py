"""Sandbox compilers: golden Podman specs, seccomp profiles and Landlock rules, plus properties.

Regenerate the goldens after a deliberate change with
    UPDATE_GOLDEN=1 pytest tests/unit/test_sandbox_compile.py
and read the diff: the golden files are the spec.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from sandbox.compile.landlock import landlock_rules
from sandbox.compile.podman_spec import (
    HOME,
    NOFILE,
    SOCK_DIR,
    SandboxMounts,
    podman_argv,
    podman_spec,
    policy_digest,
)
from sandbox.compile.seccomp import CLONE_NEWUSER, CLONE_NS_MASK, DENY, ENOSYS, seccomp_profile
from sandbox.policy import Policy, load_policy, parse_policy
from sandbox.supervisor.landlock import (
    FS_RIGHTS,
    LATEST_KNOWN_ABI,
    abi_rights,
    missing_rights,
)
from tests.helpers import assert_golden

REPO = Path(__file__).resolve().parents[2]
GOLDEN_DIR = REPO / "tests" / "golden" / "sandbox"

STRICT = """
filesystem:
  read_only: [/opt/tools]
  read_write: [/workspace]
landlock:
  compatibility: best_effort
process: {uid: 2000, gid: 2000}
resources: {memory: 512m, pids: 64, cpus: 0.5}
syscalls:
  deny: [socketpair, execveat, mknod, mknodat]
"""


def _policy(case: str) -> Policy:
    if case == "strict":
        return parse_policy(STRICT, "strict.yaml")
    return load_policy(REPO / "sandbox" / "policies" / f"{case}.yaml")


def _mounts(case: str) -> SandboxMounts:
    base = f"/var/lib/appliance/sandboxes/{case}"
    return SandboxMounts(
        egress_dir=f"{base}/egress",
        supervisor_dir="/usr/lib/appliance/supervisor",
        config_dir=f"{base}/config",
        report_dir=f"{base}/report",
        seccomp_path=f"{base}/seccomp.json",
        state_dir=f"{base}/home" if case == "openclaw" else None,
    )


def _spec(case: str) -> dict[str, Any]:
    command = ["openclaw", "agent", "exec", "hello"] if case == "openclaw" else None
    return podman_spec(
        _policy(case),
        name=f"sb-{case}",
        image="localhost/appliance-sandbox:sha256-0123abcd",
        mounts=_mounts(case),
        command=command,
    )


def _compile(case: str, kind: str) -> Any:
    if kind == "podman":
        return _spec(case)
    if kind == "argv":
        return podman_argv(_spec(case))
    if kind == "seccomp":
        return seccomp_profile(_policy(case))
    return landlock_rules(_policy(case), abi=3 if case == "strict" else None)


CASES = ["default", "openclaw", "strict"]
KINDS = ["podman", "argv", "seccomp", "landlock"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", CASES)
def test_golden(case: str, kind: str) -> None:
    actual = json.dumps(_compile(case, kind), indent=2, sort_keys=False) + "\n"
    assert_golden(GOLDEN_DIR / f"{case}.{kind}.json", actual)


# --- Podman spec --------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_spec_hardening(case: str) -> None:
    spec, policy = _spec(case), _policy(case)
    assert spec["network_mode"] == "none"
    assert spec["read_only"] is True and spec["read_write_tmpfs"] is False
    assert spec["cap_drop"] == ["ALL"] and "cap_add" not in spec
    assert spec["no_new_privileges"] is True and spec["privileged"] is False
    assert spec["seccomp_profile_path"] == _mounts(case).seccomp_path
    assert "security_opt" not in spec  # podman-py would send it as SELinux options
    assert "devices" not in spec and spec["init"] is False and "userns_mode" not in spec
    uid, gid = spec["user"].split(":")
    assert int(uid) == policy.process.uid != 0 and int(gid) == policy.process.gid != 0
    assert spec["mem_limit"] == policy.resources.memory
    assert spec["pids_limit"] == policy.resources.pids
    assert spec["cpu_quota"] / spec["cpu_period"] == pytest.approx(policy.resources.cpus)
    assert spec["labels"]["appliance.policy-digest"] == policy_digest(policy)


@pytest.mark.parametrize("case", CASES)
def test_ulimits_explicit(case: str) -> None:
    limits = {u["Name"]: (u["Soft"], u["Hard"]) for u in _spec(case)["ulimits"]}
    assert limits["nofile"] == (NOFILE, NOFILE) == (1024, 1024)
    soft, hard = limits["nproc"]
    assert soft == hard <= 1000 and hard <= _policy(case).resources.pids


@pytest.mark.parametrize("case", CASES)
def test_no_secrets_in_environment(case: str) -> None:
    secretish = re.compile(r"sk-|token|key|secret|password", re.IGNORECASE)
    for name, value in _spec(case)["environment"].items():
        assert not secretish.search(name) and not secretish.search(value), name
    assert _spec(case)["environment"]["HTTPS_PROXY"] == "http://127.0.0.1:3128"


@pytest.mark.parametrize("case", CASES)
def test_mounts(case: str) -> None:
    spec, policy = _spec(case), _policy(case)
    by_target = {m["target"]: m for m in spec["mounts"]}
    assert all(m["target"] != "/" for m in spec["mounts"])
    for target in ("/opt/appliance/supervisor", "/run/appliance/config", "/run/appliance/egress"):
        assert by_target[target]["type"] == "bind" and by_target[target]["read_only"] is True
    assert by_target["/run/appliance/report"]["read_only"] is False
    writable = {m["target"] for m in spec["mounts"] if m.get("read_only") is not True}
    assert writable == set(policy.filesystem.read_write) | {"/run/appliance/report"}
    assert "/var/tmp" not in writable  # not unless the policy lists it
    for mount in spec["mounts"]:
        if mount["type"] == "tmpfs":
            assert mount["size"] == policy.resources.memory // 2
            assert mount["propagation"] == "exec"


def test_state_volume_is_the_home_bind() -> None:
    home = next(m for m in _spec("openclaw")["mounts"] if m["target"] == HOME)
    assert home == {
        "type": "bind",
        "source": "/var/lib/appliance/sandboxes/openclaw/home",
        "target": HOME,
        "read_only": False,
    }


def test_state_volume_needs_home_writable() -> None:
    with pytest.raises(ValueError, match="read_write"):
        podman_spec(
            _policy("strict"), name="x", image="i", mounts=_mounts("openclaw"), command=None
        )


def test_podman_py_payload() -> None:
    """What podman-py actually sends: our keys survive its translation."""
    from podman.domain.containers_create import CreateMixin

    payload = CreateMixin._render_payload(_spec("openclaw"))
    assert payload["no_new_privileges"] is True
    assert payload["seccomp_profile_path"].endswith("/seccomp.json")
    assert payload["selinux_opts"] is None
    assert payload["netns"] == {"nsmode": "none"}
    assert payload["read_only_filesystem"] is True and payload["read_write_tmpfs"] is False
    assert payload["resource_limits"]["cpu"]["quota"] == 200_000
    assert payload["resource_limits"]["pids"] == {"limit": 512}
    assert {"type": "nofile", "soft": 1024, "hard": 1024} in payload["r_limits"]
    tmp = next(m for m in payload["mounts"] if m["destination"] == "/tmp")
    assert tmp["type"] == "tmpfs" and "exec" in tmp["options"]
    assert {"size=2147483648", "mode=1777"} <= set(tmp["options"])
    egress = next(m for m in payload["mounts"] if m["destination"] == "/run/appliance/egress")
    assert egress["options"] == ["ro"]


def test_digest_ignores_network_only() -> None:
    policy = _policy("openclaw")
    assert policy_digest(policy) == policy_digest(policy.with_network(_policy("default").network))
    assert policy_digest(policy) != policy_digest(_policy("default"))


# --- seccomp ------------------------------------------------------------------------------------


def _rules(profile: dict[str, Any], name: str) -> list[dict[str, Any]]:
    return [r for r in profile["syscalls"] if name in r["names"]]


def _unconditional(profile: dict[str, Any], name: str, action: str) -> bool:
    return any(r["action"] == action and not r.get("args") for r in _rules(profile, name))


@pytest.mark.parametrize("case", CASES)
def test_every_deny_present_and_never_allowed(case: str) -> None:
    profile, policy = seccomp_profile(_policy(case)), _policy(case)
    for name in set(DENY) | set(policy.syscalls.deny):
        rules = _rules(profile, name)
        assert rules and all(r["action"] == "SCMP_ACT_ERRNO" for r in rules), name
        assert all(r["errnoRet"] == 1 for r in rules), name


def test_openshell_list_covered() -> None:
    openshell = {
        "memfd_create", "ptrace", "bpf", "process_vm_readv", "process_vm_writev", "pidfd_open",
        "pidfd_getfd", "pidfd_send_signal", "io_uring_setup", "setns", "userfaultfd",
        "perf_event_open", "mount", "fsopen", "fsconfig", "fsmount", "fspick", "move_mount",
        "open_tree", "umount2", "pivot_root", "unshare", "keyctl", "kexec_load", "init_module",
        "finit_module",
    }  # fmt: skip
    assert openshell <= set(DENY)


def test_clone3_enosys_and_clone_masked() -> None:
    profile = seccomp_profile(Policy())
    (clone3,) = _rules(profile, "clone3")
    assert clone3["action"] == "SCMP_ACT_ERRNO" and clone3["errnoRet"] == ENOSYS == 38
    (clone,) = _rules(profile, "clone")
    assert clone["args"] == [
        {"index": 0, "value": CLONE_NS_MASK, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}
    ]
    assert CLONE_NS_MASK & CLONE_NEWUSER and CLONE_NS_MASK == 2114060288


def test_socket_families_allow_list() -> None:
    profile = seccomp_profile(Policy())
    rules = _rules(profile, "socket")
    assert all(r["action"] == "SCMP_ACT_ALLOW" and r["args"] for r in rules)
    families = {a["value"] for r in rules for a in r["args"] if a["index"] == 0}
    assert families == {1, 2, 10, 16}  # AF_PACKET 17, AF_VSOCK 40, AF_ALG 38 ... fall to EPERM
    for rule in rules:
        args = {a["index"]: a for a in rule["args"]}
        if args[0]["value"] == 16:
            assert args[2]["value"] == 0  # NETLINK_ROUTE only
        if args[0]["value"] in (2, 10):
            assert args[1]["op"] == "SCMP_CMP_MASKED_EQ" and args[1]["value"] == 0xF
            assert args[1]["valueTwo"] in (1, 2)  # never SOCK_RAW (3)


def test_execveat_without_empty_path() -> None:
    (rule,) = _rules(seccomp_profile(Policy()), "execveat")
    assert rule["args"] == [
        {"index": 4, "value": 0x1000, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}
    ]


def test_policy_deny_removes_allow() -> None:
    profile = seccomp_profile(_policy("strict"))
    for name in ("socketpair", "execveat", "mknod"):
        assert not any(r["action"] == "SCMP_ACT_ALLOW" for r in _rules(profile, name)), name


def test_profile_shape_is_what_podman_reads() -> None:
    profile = seccomp_profile(Policy())
    assert set(profile) == {"defaultAction", "defaultErrnoRet", "archMap", "syscalls"}
    assert profile["defaultAction"] == "SCMP_ACT_ERRNO" and profile["defaultErrnoRet"] == 1
    arches = {a["architecture"] for a in profile["archMap"]}
    assert arches == {"SCMP_ARCH_X86_64", "SCMP_ARCH_AARCH64"}
    allowed_keys = {"names", "action", "errnoRet", "args", "comment"}
    for rule in profile["syscalls"]:
        assert set(rule) <= allowed_keys
    assert _unconditional(profile, "read", "SCMP_ACT_ALLOW")
    assert _unconditional(profile, "landlock_restrict_self", "SCMP_ACT_ALLOW")  # supervisor


# --- Landlock -----------------------------------------------------------------------------------


def test_abi_rights_grow() -> None:
    assert abi_rights(1) == list(FS_RIGHTS)[:13]
    assert "refer" in abi_rights(2) and "refer" not in abi_rights(1)
    assert "truncate" in abi_rights(3)
    assert {"bind_tcp", "connect_tcp"} <= set(abi_rights(4))
    assert "ioctl_dev" in abi_rights(5) and "ioctl_dev" not in abi_rights(4)
    assert {"abstract_unix_socket", "signal"} <= set(abi_rights(6))
    assert abi_rights(7) == abi_rights(6)
    assert missing_rights(LATEST_KNOWN_ABI) == []
    assert missing_rights(3) == [
        "ioctl_dev", "bind_tcp", "connect_tcp", "abstract_unix_socket", "signal"
    ]  # fmt: skip


def test_landlock_latest() -> None:
    rules = landlock_rules(_policy("openclaw"))
    assert rules["abi"] == 7 and rules["min_abi"] == 6 and rules["missing"] == []
    assert rules["handled"]["fs"] == abi_rights(5)[:16]
    assert rules["net"] == {"connect_tcp": [3128], "bind_tcp": []}
    assert rules["handled"]["scope"] == ["abstract_unix_socket", "signal"]
    by_path = {r["path"]: r for r in rules["fs"]}
    assert by_path["/workspace"]["access"] == rules["handled"]["fs"]
    assert by_path["/opt/openclaw"]["access"] == ["execute", "read_file", "read_dir"]
    assert not by_path["/workspace"]["optional"]
    for private in ("/opt/appliance", "/run/appliance", "/run/appliance/config", "/", "/etc"):
        assert private not in by_path


def test_landlock_old_abi_best_effort() -> None:
    rules = landlock_rules(_policy("strict"), abi=3)
    assert rules["compatibility"] == "best_effort" and rules["min_abi"] == 0
    assert rules["handled"]["net"] == [] and rules["net"]["connect_tcp"] == []
    assert "ioctl_dev" not in rules["handled"]["fs"] and "truncate" in rules["handled"]["fs"]
    assert rules["missing"] == missing_rights(3)


def test_landlock_hard_requirement_min_abi_follows_rights() -> None:
    assert landlock_rules(_policy("default"), abi=4)["min_abi"] == 4
    assert landlock_rules(_policy("default"), abi=2)["min_abi"] == 2


def test_landlock_unknown_abi() -> None:
    with pytest.raises(ValueError):
        landlock_rules(Policy(), abi=8)


# --- a runtime service: listen ports and the agent socket's mount --------------------------------

SERVICE_PORT = 18789


def _service_policy() -> Policy:
    base = _policy("openclaw").model_dump(mode="json")
    base["process"]["listen"] = [SERVICE_PORT]
    return Policy.model_validate(base)


def _service_spec() -> dict[str, Any]:
    mounts = _mounts("openclaw")
    mounts = SandboxMounts(**{**vars(mounts), "sock_dir": "/var/lib/appliance/sandboxes/svc/sock"})
    return podman_spec(
        _service_policy(),
        name="sb-service",
        image="localhost/appliance-sandbox:sha256-0123abcd",
        mounts=mounts,
        command=["openclaw", "gateway", "run"],
    )


@pytest.mark.parametrize("kind", ["podman", "argv", "landlock"])
def test_golden_service(kind: str) -> None:
    compiled = {
        "podman": _service_spec,
        "argv": lambda: podman_argv(_service_spec()),
        "landlock": lambda: landlock_rules(_service_policy()),
    }[kind]()
    actual = json.dumps(compiled, indent=2, sort_keys=False) + "\n"
    assert_golden(GOLDEN_DIR / f"service.{kind}.json", actual)


def test_service_sock_mount_is_the_only_addition() -> None:
    plain = _spec("openclaw")["mounts"]
    with_sock = _service_spec()["mounts"]
    added = [m for m in with_sock if m not in plain]
    assert added == [
        {
            "type": "bind",
            "source": "/var/lib/appliance/sandboxes/svc/sock",
            "target": SOCK_DIR,
            "read_only": False,
        }
    ]
    assert [m for m in with_sock if m != added[0]] == plain


def test_landlock_listen_binds_but_never_connects() -> None:
    """The agent's domain binds its runtime's ports but cannot connect to them (it would drive
    its runtime around the control plane); PID 1's forwarder adds the connect in its own."""
    rules = landlock_rules(_service_policy())
    assert rules["net"] == {"connect_tcp": [3128], "bind_tcp": [SERVICE_PORT]}
    two = Policy.model_validate({"process": {"listen": [9000, 8080]}})
    assert landlock_rules(two)["net"] == {"connect_tcp": [3128], "bind_tcp": [8080, 9000]}
    # A kernel without network rights (ABI < 4) handles none: nothing to list.
    assert landlock_rules(two, abi=3)["net"] == {"connect_tcp": [], "bind_tcp": []}


def test_empty_listen_changes_no_digest() -> None:
    """`listen: []` is the default and is not serialised: existing digests stay what they were."""
    for case in CASES:
        policy = _policy(case)
        explicit = policy.model_copy(
            update={"process": policy.process.model_copy(update={"listen": []})}
        )
        assert "listen" not in policy.static_part()["process"]
        assert policy_digest(explicit) == policy_digest(policy)
        assert "listen" not in policy.to_yaml()
    assert policy_digest(_service_policy()) != policy_digest(_policy("openclaw"))
