"""Runs INSIDE a sandbox as the agent: tries to escape in many named ways and prints one JSON line.

Every attempt records one outcome string, and the test compares each with the one isolation must
produce (tests/security/test_escape_battery.py, EXPECTED):

- an errno name ("EPERM", "EACCES", "ENOENT", ...): the refusal of an OSError;
- "HTTP 403" (the egress proxy's refusal), "EAI_..." (a resolver error), "MemoryError" (the
  memory cap), "SIGKILL" (a child killed by a signal);
- "ok" for the positive controls: the same helpers doing what the sandbox allows, so a probe that
  is broken (a typo, a wrong path) shows up as a failed control instead of a "refusal";
- "ESCAPED: ..." when the attempt worked, "raised <Type>: ..." when the probe itself crashed.
  Neither is ever expected, so a crashing probe fails the battery.

The test prepends `PARAMS = {...}`: the policy's caps and host facts that only isolation can hide
(paths that exist on the host, ports the host listens on). Stdlib only. Run on a host, without the
sandbox, the same probe escapes (the test's `EXPECTED` then fails: see its module docstring).
"""

import ctypes
import errno
import json
import os
import resource
import signal
import socket
import time

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
NR = {  # x86_64 syscall numbers
    "getpid": 39, "ptrace": 101, "mount": 165, "umount2": 166, "pivot_root": 155, "chroot": 161,
    "unshare": 272, "setns": 308, "bpf": 321, "keyctl": 250, "add_key": 248,
    "io_uring_setup": 425, "memfd_create": 319, "userfaultfd": 323, "perf_event_open": 298,
    "pidfd_open": 434, "process_vm_readv": 310, "kexec_load": 246, "init_module": 175,
    "clone3": 435, "open_tree": 428, "fsopen": 430, "move_mount": 429, "acct": 163,
    "swapon": 167, "reboot": 169, "execveat": 322,
}  # fmt: skip
PARAMS = globals().get(
    "PARAMS",  # defaults: for running this file by hand
    {
        "memory": 256 << 20,
        "pids": 48,
        "gateway_port": 8080,
        "other_port": 22,
        "host_paths": {},
    },
)
results: dict[str, str] = {}
details: dict[str, object] = {}


class Refused(Exception):
    """A refusal that is not an errno; its message is the outcome ("HTTP 403", "MemoryError")."""


def outcome(fn) -> str:
    try:
        got = fn()
    except socket.gaierror as exc:  # errno is EAI_*, not an errno.h value
        names = {getattr(socket, n): n for n in dir(socket) if n.startswith("EAI_")}
        return names.get(exc.errno, f"raised gaierror: {exc}")
    except OSError as exc:
        return errno.errorcode.get(exc.errno, f"raised OSError: {exc}") if exc.errno else repr(exc)
    except Refused as exc:
        return str(exc)
    except Exception as exc:  # a broken probe: never an expected outcome
        return f"raised {type(exc).__name__}: {exc}"
    return f"ESCAPED: {got!r}"


def attempt(name):
    def wrap(fn):
        results[name] = outcome(fn)
        return fn

    return wrap


def control(name):
    """A positive control: `fn` must work; its outcome is "ok" or what went wrong."""

    def wrap(fn):
        got = outcome(fn)
        results[name] = "ok" if got.startswith("ESCAPED: ") else got
        return fn

    return wrap


def sys_call(name, *args):
    ret = libc.syscall(NR[name], *[ctypes.c_long(a) for a in args])
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


def in_child(fn) -> str:
    """Run fn in a forked child (stdout to /dev/null: an exec'd program stays quiet).

    The child's OSError comes back as an OSError here, its death by signal as "SIG...", another
    exception as a crash; "exec succeeded" or fn's value when the child got past fn.
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            os.set_inheritable(w, False)
            null = os.open("/dev/null", os.O_WRONLY)
            os.dup2(null, 1)
            got = fn()
            os.write(w, json.dumps({"value": repr(got)}).encode())
        except OSError as exc:
            os.write(w, json.dumps({"errno": exc.errno}).encode())
        except BaseException as exc:
            os.write(w, json.dumps({"crash": f"{type(exc).__name__}: {exc}"}).encode())
        os._exit(0)
    os.close(w)
    out = b""
    while chunk := os.read(r, 4096):
        out += chunk
    os.close(r)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        raise Refused(signal.Signals(os.WTERMSIG(status)).name)
    if not out:
        return "exec succeeded"  # the pipe closed on exec (close-on-exec) and nothing came back
    msg = json.loads(out)
    if "errno" in msg:
        raise OSError(msg["errno"], os.strerror(msg["errno"]))
    if "crash" in msg:
        raise RuntimeError(f"child: {msg['crash']}")
    return msg["value"]


def read16(path: str) -> bytes:
    with open(path, "rb") as fh:
        return fh.read(16)


def write_x(path: str) -> str:
    with open(path, "w") as fh:
        fh.write("x")
    return f"wrote {path}"


def dial(host: str, port: int) -> str:
    """Connect; a listener that greets (the test's host listeners do) proves where we got."""
    with socket.create_connection((host, port), timeout=3) as c:
        c.settimeout(0.5)
        try:
            return f"connected, greeted {c.recv(64)!r}"
        except TimeoutError:
            return "connected"


# -- positive controls: the helpers work where the sandbox allows them ------------------------
control("control_syscall_getpid")(lambda: sys_call("getpid"))
control("control_inet_socket")(lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM).close())
control("control_read_usr")(lambda: read16("/usr/lib/os-release"))
control("control_write_tmp")(lambda: write_x("/tmp/control"))
control("control_connect_forwarder")(lambda: dial("127.0.0.1", 3128))
control("control_child_exec_usr")(lambda: in_child(lambda: os.execv("/bin/true", ["true"])))
# The exec target below: executable by its mode bits, outside every path Landlock lets us execute.
EXEC_TARGET = "/etc/update-motd.d/10-uname"


@control("control_exec_target_is_executable")
def _():
    if not os.stat(EXEC_TARGET).st_mode & 0o111:
        raise RuntimeError(f"{EXEC_TARGET} has no execute bit: pick another target")


# -- syscalls the seccomp profile refuses (EPERM; clone3 ENOSYS) ------------------------------
# Arguments are chosen so that, without seccomp, most of these answer something else (EFAULT,
# EINVAL, or success): an EPERM then shows the filter, not just the missing capabilities.
for _name, _args in {
    "mount_null": ("mount", 0, 0, 0, 0, 0),  # EFAULT unfiltered: the path is read first
    "umount2_bad_flags": ("umount2", 0, 0xFFFF),  # EINVAL unfiltered
    "pivot_root": ("pivot_root", 0, 0),
    "chroot_null": ("chroot", 0),  # EFAULT unfiltered
    "unshare_netns": ("unshare", 0x40000000),
    "unshare_mountns": ("unshare", 0x00020000),
    "setns_stdin": ("setns", 0, 0),  # EINVAL unfiltered: fd 0 is no namespace
    "bpf_prog_load": ("bpf", 5, 0, 0),
    "keyctl_get_id": ("keyctl", 0, 0),  # ENOKEY/EINVAL unfiltered
    "add_key_null": ("add_key", 0, 0, 0, 0, 0),  # EFAULT unfiltered
    "io_uring_setup": ("io_uring_setup", 8, 0),  # EFAULT unfiltered
    "memfd_create_null": ("memfd_create", 0, 0),  # EFAULT unfiltered
    "perf_event_open_null": ("perf_event_open", 0, 0, -1, -1, 0),  # EFAULT unfiltered
    "kexec_load": ("kexec_load", 0, 0, 0, 0),
    "init_module": ("init_module", 0, 0, 0),
    "open_tree_null": ("open_tree", -100, 0, 0),  # EFAULT unfiltered
    "fsopen": ("fsopen", 0, 0),
    "move_mount": ("move_mount", 0, 0, 0, 0, 0),
    "acct": ("acct", 0),
    "swapon": ("swapon", 0, 0),
    "reboot": ("reboot", 0, 0, 0, 0),
}.items():
    attempt(f"syscall_{_name}")(lambda a=_args: sys_call(*a))
# These work for any unprivileged process without the filter: run in a child (a new user
# namespace must not carry the rest of the probe with it).
attempt("syscall_unshare_userns")(lambda: in_child(lambda: sys_call("unshare", 0x10000000)))
attempt("syscall_userfaultfd_user_mode")(lambda: sys_call("userfaultfd", 1))  # UFFD_USER_MODE_ONLY
attempt("syscall_pidfd_open_self")(lambda: sys_call("pidfd_open", os.getpid(), 0))
attempt("syscall_process_vm_readv_self")(
    lambda: sys_call("process_vm_readv", os.getpid(), 0, 0, 0, 0, 0)
)
attempt("syscall_clone3")(lambda: sys_call("clone3", 0, 0))


@attempt("syscall_ptrace_attach_own_child")
def _():
    pid = os.fork()
    if pid == 0:
        time.sleep(30)
        os._exit(0)
    try:
        return sys_call("ptrace", 16, pid, 0, 0)  # PTRACE_ATTACH: allowed on a child unfiltered
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


# -- sockets the seccomp profile refuses ------------------------------------------------------
for _fam, _type, _proto, _label in [
    (17, socket.SOCK_RAW, 0, "packet_socket"),
    (40, socket.SOCK_STREAM, 0, "vsock_socket"),
    (socket.AF_INET, socket.SOCK_RAW, 1, "raw_icmp_socket"),
    (socket.AF_INET6, socket.SOCK_RAW, 58, "raw_icmp6_socket"),
    (socket.AF_NETLINK, socket.SOCK_RAW, 9, "netlink_audit_socket"),
    (socket.AF_NETLINK, socket.SOCK_RAW, 4, "netlink_sock_diag_socket"),
    (38, socket.SOCK_SEQPACKET, 0, "af_alg_socket"),
]:
    attempt(_label)(lambda f=_fam, t=_type, p=_proto: socket.socket(f, t, p).close())

# -- network: Landlock allows TCP connect to 3128 only; the namespace has loopback only -------
attempt("tcp_direct_dial")(lambda: dial("1.1.1.1", 80))
attempt("tcp_dial_offbox_on_forwarder_port")(lambda: dial("1.1.1.1", 3128))  # past Landlock
attempt("ipv6_direct_dial")(lambda: dial("2606:4700::1111", 80))


@attempt("udp_dns_direct")
def _():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        return s.sendto(b"x", ("8.8.8.8", 53))


attempt("dns_lookup")(lambda: socket.getaddrinfo("example.com", 443))
# The test listens on the host's loopback on these ports: only isolation can keep us out.
attempt("loopback_other_port")(lambda: dial("127.0.0.1", PARAMS["other_port"]))
attempt("gateway_direct_loopback")(lambda: dial("127.0.0.1", PARAMS["gateway_port"]))
attempt("gateway_via_podman_bridge")(lambda: dial("10.88.0.1", PARAMS["gateway_port"]))
attempt("tcp_bind_listen")(lambda: socket.create_server(("127.0.0.1", 8081)).close())

# -- files: Landlock (EACCES) for what is in the sandbox, the mount namespace (ENOENT) for what
# is only on the host -----------------------------------------------------------------------
for _label, _path in [
    ("read_etc_shadow", "/etc/shadow"),
    ("read_etc_world_readable", "/etc/debian_version"),  # mode 0644: only Landlock refuses it
    ("read_sandbox_config", "/run/appliance/config/sandbox.json"),
    ("read_supervisor_code", "/opt/appliance/supervisor/init.py"),
    ("read_pid1_environ", "/proc/1/environ"),
    ("read_pid1_mem", "/proc/1/mem"),
    ("read_pid1_root_etc", "/proc/1/root/etc/debian_version"),
]:
    attempt(_label)(lambda p=_path: read16(p))
for _label, _path in sorted(PARAMS["host_paths"].items()):  # exist on the host (the test checks)
    attempt(_label)(lambda p=_path: read16(p) if os.path.isfile(p) else os.listdir(p))
attempt("list_egress_dir_for_other_sockets")(lambda: os.listdir("/run/appliance/egress"))

for _label, _path in [
    ("write_root", "/escape"),
    ("write_usr", "/usr/escape"),
    ("write_etc", "/etc/escape"),
    ("write_var_tmp", "/var/tmp/escape"),
    ("write_dev_shm", "/dev/shm/escape"),
    ("write_report_dir", "/run/appliance/report/enforcement.json"),
    ("write_own_policy", "/run/appliance/config/sandbox.json"),
]:
    attempt(_label)(lambda p=_path: write_x(p))

# -- exec: Landlock's execute right, and seccomp's AT_EMPTY_PATH rule for execveat ------------
_EMPTY = ctypes.create_string_buffer(1)


def _execveat_empty_path(path: str) -> None:
    fd = os.open(path, os.O_PATH)  # O_PATH needs no access right: the exec must still fail
    sys_call("execveat", fd, ctypes.addressof(_EMPTY), 0, 0, 0x1000)  # AT_EMPTY_PATH


attempt("exec_outside_landlock")(lambda: in_child(lambda: os.execv(EXEC_TARGET, ["x"])))
attempt("exec_via_proc_self_fd")(
    lambda: in_child(lambda: os.execv(f"/proc/self/fd/{os.open(EXEC_TARGET, os.O_PATH)}", ["x"]))
)
attempt("execveat_opath_empty_path")(lambda: in_child(lambda: _execveat_empty_path(EXEC_TARGET)))
attempt("exec_pid1_exe")(lambda: in_child(lambda: os.execv("/proc/1/exe", ["x", "-c", "pass"])))

# -- privileges and limits -----------------------------------------------------------------------


@attempt("setuid_binaries_in_reach")
def _():
    """A setuid/setgid program we can run would undo the dropped privileges (the image strips
    them; no_new_privs and nosuid are the second line, checked in the posture)."""
    seen, found = 0, []
    for top in ("/usr", "/bin", "/sbin", "/lib"):
        for d, _, files in os.walk(top):
            for f in files:
                st = os.lstat(os.path.join(d, f))
                seen += 1
                if st.st_mode & 0o6000 and st.st_mode & 0o111:
                    found.append(os.path.join(d, f))
    details["setuid_scan_files"] = seen
    if found:
        return found
    if seen < 500:  # the walk saw too little to mean anything (a broken walk finds nothing)
        raise RuntimeError(f"walked only {seen} files")
    raise Refused("absent")


attempt("setuid_root")(lambda: os.setuid(0))


def _raise_hard_limit(which: int):
    hard = resource.getrlimit(which)[1]
    try:
        resource.setrlimit(which, (hard, hard + 1 if hard != resource.RLIM_INFINITY else hard))
    except ValueError as exc:  # CPython turns setrlimit's EPERM into this exact ValueError
        if str(exc) == "not allowed to raise maximum limit":
            raise OSError(errno.EPERM, str(exc)) from None
        raise
    if hard == resource.RLIM_INFINITY:
        raise Refused("hard limit already unlimited")
    return resource.getrlimit(which)


attempt("raise_core_limit")(lambda: _raise_hard_limit(resource.RLIMIT_CORE))
attempt("raise_nproc_limit")(lambda: _raise_hard_limit(resource.RLIMIT_NPROC))


@attempt("fork_bomb_beyond_pids_limit")
def _():
    kids = []
    try:
        while len(kids) <= PARAMS["pids"]:
            pid = os.fork()
            if pid == 0:
                time.sleep(60)
                os._exit(0)
            kids.append(pid)
    except OSError:
        details["fork_bomb_children"] = len(kids)
        raise
    finally:
        for pid in kids:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    return f"{len(kids)} children, more than pids={PARAMS['pids']}"


@attempt("memory_bomb_beyond_memory_limit")
def _():
    step = 16 << 20
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child hoards touched memory and reports how much it holds
        try:
            os.close(r)
            hoard = []
            while len(hoard) * step < 2 * PARAMS["memory"]:
                hoard.append(b"\x01" * step)
                os.write(w, b"+")
            os.write(w, b"E")
        except MemoryError:
            os.write(w, b"M")
        finally:
            os._exit(0)
    os.close(w)
    got = b""
    while chunk := os.read(r, 4096):
        got += chunk
    os.close(r)
    _, status = os.waitpid(pid, 0)
    details["memory_bomb_held_mib"] = held = got.count(b"+") * step >> 20
    if held > PARAMS["memory"] >> 20:
        return f"held {held} MiB, limit {PARAMS['memory'] >> 20} MiB"
    if got.endswith(b"M"):
        raise Refused("MemoryError")
    if os.WIFSIGNALED(status):
        raise Refused(signal.Signals(os.WTERMSIG(status)).name)
    raise RuntimeError(f"child ended with {got[-1:]!r}, wait status {status}")


attempt("kill_pid1")(lambda: os.kill(1, signal.SIGKILL))


# -- the egress proxy refuses what the policy does not allow ------------------------------------
def _proxy(request: bytes) -> str:
    with socket.create_connection(("127.0.0.1", 3128), timeout=10) as c:
        c.sendall(request)
        line = c.recv(200).decode(errors="replace").split("\r\n")[0]
    code = line.split(" ")[1] if line.startswith("HTTP/1.") and " " in line else line
    if code == "200":
        return line
    raise Refused(f"HTTP {code}")


attempt("proxy_connect_unlisted_host")(
    lambda: _proxy(b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n")
)
attempt("proxy_connect_loopback")(
    lambda: _proxy(b"CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: 127.0.0.1:22\r\n\r\n")
)
attempt("proxy_connect_metadata")(
    lambda: _proxy(b"CONNECT 169.254.169.254:80 HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n")
)
attempt("proxy_connect_private")(
    lambda: _proxy(b"CONNECT 10.0.0.1:80 HTTP/1.1\r\nHost: 10.0.0.1\r\n\r\n")
)
attempt("proxy_host_header_smuggle")(
    lambda: _proxy(b"GET http://evil.example/ HTTP/1.1\r\nHost: inference.local\r\n\r\n")
)


# -- secrets: the sandbox's key is nowhere in its environment or /proc ------------------------
def _scan(needle: str) -> list[str]:
    found = [f"env {k}" for k, v in os.environ.items() if needle in v]
    for pid in filter(str.isdigit, os.listdir("/proc")):
        for f in ("environ", "cmdline"):
            try:
                if needle.encode() in open(f"/proc/{pid}/{f}", "rb").read():
                    found.append(f"/proc/{pid}/{f}")
            except OSError:
                pass  # the supervisor's entries: EACCES (non-dumpable), checked above
    return found


@control("control_scan_finds_a_planted_value")
def _():
    """The scan must see a value planted where a leaked key would sit (a child's environment)."""
    canary = f"canary-{os.getpid()}-{time.monotonic_ns()}"
    pid = os.fork()
    if pid == 0:
        os.execve("/bin/sleep", ["sleep", "5"], {"PLANTED": canary})
    try:
        deadline = time.monotonic() + 5
        while not (hits := _scan(canary)) and time.monotonic() < deadline:
            time.sleep(0.05)  # until the child has exec'd with its new environment
        if f"/proc/{pid}/environ" not in hits:
            raise LookupError(f"planted value not found: {hits}")
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


@attempt("find_key_in_env_or_proc")
def _():
    if found := _scan("sk-" + "app-"):  # built at run time: this source is on PID 1's cmdline
        return found
    raise Refused("absent")


status = dict(
    line.split(":\t", 1) for line in open("/proc/self/status").read().splitlines() if ":\t" in line
)
posture = {
    "uid": os.getuid(),
    "no_new_privs": status.get("NoNewPrivs", "").strip(),
    "seccomp": status.get("Seccomp", "").strip(),
    "cap_eff": status.get("CapEff", "").strip(),
    "cap_bnd": status.get("CapBnd", "").strip(),
    "pid1": open("/proc/1/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace"),
}
print(
    "PROBE " + json.dumps({"results": results, "details": details, "posture": posture}), flush=True
)
