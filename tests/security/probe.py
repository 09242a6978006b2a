"""Runs INSIDE a sandbox as the agent: tries to escape in many named ways and prints one JSON line.

Each attempt returns "blocked: <why>" or "ESCAPED: <what happened>". Stdlib only.
The test prepends `LIMITS = {"memory": bytes, "pids": n, "gateway_port": n}`: the policy's caps.
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
    "ptrace": 101, "mount": 165, "umount2": 166, "pivot_root": 155, "chroot": 161,
    "unshare": 272, "setns": 308, "bpf": 321, "keyctl": 250, "add_key": 248,
    "io_uring_setup": 425, "memfd_create": 319, "userfaultfd": 323, "perf_event_open": 298,
    "pidfd_open": 434, "process_vm_readv": 310, "kexec_load": 246, "init_module": 175,
    "clone3": 435, "open_tree": 428, "fsopen": 430, "move_mount": 429, "acct": 163,
    "swapon": 167, "reboot": 169, "quotactl": 179, "execveat": 322,
}  # fmt: skip
LIMITS = globals().get("LIMITS", {"memory": 2 << 30, "pids": 256, "gateway_port": 8080})
results: dict[str, str] = {}


def attempt(name):
    def wrap(fn):
        try:
            outcome = fn()
            results[name] = f"ESCAPED: {outcome!r}"
        except OSError as exc:
            why = errno.errorcode.get(exc.errno, exc.errno) if exc.errno else exc
            results[name] = f"blocked: {why}"
        except Exception as exc:  # any refusal counts, and is named
            results[name] = f"blocked: {type(exc).__name__}: {exc}"
        return fn

    return wrap


def sys_call(name, *args):
    ret = libc.syscall(NR[name], *[ctypes.c_long(a) for a in args])
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


for _name, _args in {
    "ptrace_attach_pid1": ("ptrace", 16, 1, 0, 0),  # PTRACE_ATTACH
    "mount_tmpfs": ("mount", 0, 0, 0, 0, 0),
    "umount_root": ("umount2", 0, 0),
    "pivot_root": ("pivot_root", 0, 0),
    "chroot": ("chroot", 0),
    "unshare_userns": ("unshare", 0x10000000),
    "unshare_netns": ("unshare", 0x40000000),
    "unshare_mountns": ("unshare", 0x00020000),
    "setns": ("setns", 0, 0),
    "bpf_prog_load": ("bpf", 5, 0, 0),
    "keyctl": ("keyctl", 0, 0),
    "add_key": ("add_key", 0, 0, 0, 0, 0),
    "io_uring_setup": ("io_uring_setup", 8, 0),
    "memfd_create": ("memfd_create", 0, 0),
    "userfaultfd": ("userfaultfd", 0),
    "perf_event_open": ("perf_event_open", 0, 0, -1, -1, 0),
    "pidfd_open_pid1": ("pidfd_open", 1, 0),
    "process_vm_readv_pid1": ("process_vm_readv", 1, 0, 0, 0, 0, 0),
    "kexec_load": ("kexec_load", 0, 0, 0, 0),
    "init_module": ("init_module", 0, 0, 0),
    "open_tree": ("open_tree", -100, 0, 0),
    "fsopen": ("fsopen", 0, 0),
    "move_mount": ("move_mount", 0, 0, 0, 0, 0),
    "acct": ("acct", 0),
    "swapon": ("swapon", 0, 0),
    "reboot": ("reboot", 0, 0, 0, 0),
}.items():
    attempt(f"syscall_{_name}")(lambda a=_args: sys_call(*a))


@attempt("clone3_gives_enosys")
def _():
    try:
        sys_call("clone3", 0, 0)
    except OSError as exc:
        if exc.errno == errno.ENOSYS:
            raise
        return f"errno {exc.errno} instead of ENOSYS"
    return "clone3 succeeded"


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

attempt("tcp_direct_dial")(lambda: socket.create_connection(("1.1.1.1", 80), timeout=2))
attempt("udp_dns_direct")(
    lambda: (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM).connect(("8.8.8.8", 53))
        or socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"x", ("8.8.8.8", 53))
    )
)
attempt("ipv6_direct_dial")(lambda: socket.create_connection(("2606:4700::1111", 80), timeout=2))
attempt("dns_lookup")(lambda: socket.getaddrinfo("example.com", 443))
attempt("loopback_other_port")(lambda: socket.create_connection(("127.0.0.1", 22), timeout=2))
attempt("tcp_bind_listen")(lambda: socket.create_server(("127.0.0.1", 8081)))
attempt("gateway_direct_loopback")(
    lambda: socket.create_connection(("127.0.0.1", LIMITS["gateway_port"]), timeout=2)
)
attempt("gateway_via_podman_bridge")(
    lambda: socket.create_connection(("10.88.0.1", LIMITS["gateway_port"]), timeout=2)
)

for _label, _path in [
    ("read_etc_shadow", "/etc/shadow"),
    ("read_sandbox_config", "/run/appliance/config/sandbox.json"),
    ("read_supervisor_code", "/opt/appliance/supervisor/init.py"),
    ("read_pid1_environ", "/proc/1/environ"),
    ("read_pid1_mem", "/proc/1/mem"),
    ("read_host_state_db", "/var/lib/appliance/appliance.db"),
    ("read_host_sandbox_keys", "/var/lib/appliance/sandboxes"),
    ("list_other_sandboxes", "/var/lib/appliance-sandbox/sandboxes"),
]:
    attempt(_label)(lambda p=_path: open(p, "rb").read(16))
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
    attempt(_label)(lambda p=_path: open(p, "w").write("x"))

attempt("chmod_setuid")(
    lambda: (
        open("/tmp/s", "w").close(),
        os.chmod("/tmp/s", 0o4755),
        os.stat("/tmp/s").st_mode & 0o4000 and os.execv("/tmp/s", ["s"]),
    )
)
attempt("setuid_root")(lambda: os.setuid(0))
attempt("raise_core_limit")(lambda: resource.setrlimit(resource.RLIMIT_CORE, (1 << 20, 1 << 20)))
attempt("raise_nproc_limit")(lambda: resource.setrlimit(resource.RLIMIT_NPROC, (1 << 20, 1 << 20)))


def _in_child(fn) -> str:
    """Run fn in a forked child; it reports its OSError's errno, or nothing if fn exec'd."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            fn()
            os.write(w, b"returned")
        except OSError as exc:
            os.write(w, str(exc.errno).encode())
        except BaseException as exc:
            os.write(w, type(exc).__name__.encode())
        os._exit(0)
    os.close(w)
    out = os.read(r, 100).decode()
    os.close(r)
    os.waitpid(pid, 0)
    if out.isdigit():
        raise OSError(int(out), os.strerror(int(out)))
    if out:
        raise RuntimeError(out)
    return "exec succeeded"


_EMPTY = ctypes.create_string_buffer(1)


def _execveat_empty_path(path: str) -> None:
    fd = os.open(path, os.O_PATH)  # O_PATH needs no access right: the exec must still fail
    sys_call("execveat", fd, ctypes.addressof(_EMPTY), 0, 0, 0x1000)  # AT_EMPTY_PATH


attempt("execveat_opath_supervisor")(
    lambda: _in_child(lambda: _execveat_empty_path("/opt/appliance/supervisor/init.py"))
)
attempt("exec_pid1_exe")(lambda: _in_child(lambda: os.execv("/proc/1/exe", ["x"])))
attempt("exec_via_proc_self_fd")(
    lambda: _in_child(
        lambda: os.execv(
            f"/proc/self/fd/{os.open('/opt/appliance/supervisor/init.py', os.O_PATH)}", ["x"]
        )
    )
)


@attempt("fork_bomb_beyond_pids_limit")
def _():
    kids = []
    try:
        while len(kids) <= LIMITS["pids"]:
            pid = os.fork()
            if pid == 0:
                time.sleep(60)
                os._exit(0)
            kids.append(pid)
    except OSError as exc:
        raise OSError(exc.errno, f"fork refused after {len(kids)} children") from None
    finally:
        for pid in kids:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    return f"{len(kids)} children, more than pids={LIMITS['pids']}"


@attempt("memory_bomb_beyond_memory_limit")
def _():
    step = 32 << 20
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child hoards touched memory and reports how much it holds
        os.close(r)
        hoard = []
        try:
            while len(hoard) * step < 2 * LIMITS["memory"]:
                hoard.append(b"\x01" * step)
                os.write(w, b"+")
        except MemoryError:
            os.write(w, b"M")
        os._exit(0)
    os.close(w)
    got = b""
    while chunk := os.read(r, 4096):
        got += chunk
    os.close(r)
    _, status = os.waitpid(pid, 0)
    held = got.count(b"+") * step
    if held > LIMITS["memory"]:
        return f"held {held >> 20} MiB, limit {LIMITS['memory'] >> 20} MiB"
    how = "MemoryError" if got.endswith(b"M") else f"killed, wait status {status}"
    raise MemoryError(f"{how} at {held >> 20} MiB")


attempt("kill_pid1")(lambda: os.kill(1, 9))


def _proxy(request: bytes) -> str:
    c = socket.create_connection(("127.0.0.1", 3128), timeout=10)
    c.sendall(request)
    line = c.recv(200).decode(errors="replace").split("\r\n")[0]
    if " 200 " in line or line.endswith(" 200"):
        return line
    raise PermissionError(line)


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


@attempt("find_key_in_env_or_proc")
def _():
    needle = "sk-" + "app-"  # built at run time: this source is on PID 1's command line
    found = [k for k, v in os.environ.items() if needle in v]
    for pid in filter(str.isdigit, os.listdir("/proc")):
        for f in ("environ", "cmdline"):
            try:
                if needle.encode() in open(f"/proc/{pid}/{f}", "rb").read():
                    found.append(f"/proc/{pid}/{f}")
            except OSError:
                pass
    if found:
        return found
    raise LookupError("no key anywhere")


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
print("PROBE " + json.dumps({"results": results, "posture": posture}), flush=True)
