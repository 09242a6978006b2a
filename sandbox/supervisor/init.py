"""In-sandbox supervisor: PID 1 of every sandbox. Stdlib only (Python 3.11), run read-only as
`python3 -I /opt/appliance/supervisor/init.py` by the non-root agent uid.

Order of work, and why:
1. refuse root; no_new_privs, not dumpable (the agent shares our uid: no /proc/1/mem, no ptrace),
   empty the capability bounding set as far as we are allowed;
2. bind the forwarder's TCP listener (before Landlock: binding is a Landlock net right);
3. restrict PID 1 itself with Landlock (see `own_rules`), while still single-threaded, because
   restrict_self only covers the calling thread;
4. fork the agent: setsid, restrict further with the policy's ruleset, report its own
   /proc/self/status through a pipe, then wait for "go";
5. write the enforcement report, start the forwarder thread, say "go": the agent execs;
6. reap every child, forward signals to the agent's process group, exit with its code.

`init.py exec [--env K=V]... -- CMD...` is the other entry point: what `podman exec` runs for
`appliance sandbox exec` and agent turns. An exec'd process is not PID 1's descendant, so it would
escape the agent's Landlock domain; this applies the same ruleset (same hard_requirement rule),
then execs CMD with the agent's environment.

PID 1's own domain: every policy rule plus read on the stdlib, this directory and /proc, and
write on the report directory. A child's domain can only narrow its parent's, so PID 1's domain
must be a superset of the agent's; the point is that a compromised PID 1 (say through the
forwarder) gains nothing beyond the agent's view but the report file. Connecting to the egress
unix socket is not a Landlock-controlled action up to ABI 7 (ABI 6 scopes *abstract* sockets
only), and a future unix-socket right stays allowed because we only handle the rights we know, so
the forwarder keeps working. Both domains set the signal and abstract-socket scopes (ABI >= 6):
the agent cannot signal PID 1 or reach abstract sockets outside its domain.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import socket
import sys
import threading
import time
from dataclasses import asdict
from typing import Any, NoReturn

# -I implies -P: our directory is not on sys.path. It is a read-only mount: adding it is safe.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import landlock

DEFAULT_CONFIG = "/run/appliance/config/sandbox.json"
PR_SET_DUMPABLE, PR_GET_DUMPABLE, PR_CAPBSET_DROP = 4, 3, 24
PR_SET_NO_NEW_PRIVS, PR_SET_CHILD_SUBREAPER = 38, 36
SCOPES = ["abstract_unix_socket", "signal"]
FORWARDED = {
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
}
STOPPING = {signal.SIGTERM, signal.SIGINT}
REPORT_FILE_RIGHTS = ["read_file", "write_file", "read_dir", "make_reg", "remove_file", "truncate"]
STATUS_KEYS = ("Uid", "NoNewPrivs", "Seccomp", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")
EXIT_CONFIG, EXIT_LANDLOCK, EXIT_SPAWN = 2, 3, 4


def log(msg: str) -> None:
    sys.stderr.write(f"appliance-supervisor: {msg}\n")
    sys.stderr.flush()


def die(code: int, msg: str) -> NoReturn:
    log(msg)
    sys.exit(code)


def load_config(path: str) -> dict[str, Any]:
    """Read and check the config; defaults for the optional keys. Any problem exits 2."""
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError) as exc:
        die(EXIT_CONFIG, f"cannot read config {path}: {exc}")
    if not isinstance(cfg, dict):
        die(EXIT_CONFIG, f"{path}: expected a JSON object")
    cmd = cfg.get("command")
    if not (isinstance(cmd, list) and cmd and all(isinstance(a, str) for a in cmd)):
        die(EXIT_CONFIG, f"{path}: 'command' must be a non-empty list of strings")
    env = cfg.setdefault("env", {})
    if not (isinstance(env, dict) and all(isinstance(v, str) for v in env.values())):
        die(EXIT_CONFIG, f"{path}: 'env' must map names to strings")
    for key in ("egress_socket", "report_path"):
        if not isinstance(cfg.get(key), str):
            die(EXIT_CONFIG, f"{path}: '{key}' must be a path")
    cfg.setdefault("cwd", "/")
    cfg.setdefault("listen", "127.0.0.1:3128")
    cfg.setdefault("stop_grace_s", 10.0)  # SIGTERM → SIGKILL of the agent's group
    cfg.setdefault("exit_grace_s", 2.0)  # agent gone → remaining children get this long
    ll = cfg.setdefault("landlock", {})
    ll.setdefault("compatibility", "hard_requirement")
    ll.setdefault("min_abi", 1)
    ll.setdefault("fs", [])
    ll.setdefault("net", {"connect_tcp": [], "bind_tcp": []})
    if ll["compatibility"] not in ("hard_requirement", "best_effort"):
        die(EXIT_CONFIG, f"{path}: landlock.compatibility must be hard_requirement|best_effort")
    for rule in ll["fs"]:
        bad = [a for a in rule.get("access", []) if a not in landlock.FS_RIGHTS]
        if not isinstance(rule.get("path"), str) or not rule["path"].startswith("/") or bad:
            die(EXIT_CONFIG, f"{path}: bad landlock fs rule {rule!r}")
    return cfg


def harden_self() -> None:
    """no_new_privs, non-dumpable, bounding set emptied where we may (EPERM without CAP_SETPCAP)."""
    landlock.prctl(PR_SET_NO_NEW_PRIVS, 1)
    landlock.prctl(PR_SET_DUMPABLE, 0)
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            last = int(f.read())
    except (OSError, ValueError):
        last = 63
    for cap in range(last + 1):
        with contextlib.suppress(OSError):  # EPERM: not ours to drop; EINVAL: unknown cap
            landlock.prctl(PR_CAPBSET_DROP, cap)


def proc_status(raw: bytes) -> dict[str, str]:
    out = {}
    for line in raw.decode(errors="replace").splitlines():
        key, _, value = line.partition(":")
        if key in STATUS_KEYS:
            out[key] = value.strip()
    return out


def own_rules(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """PID 1's Landlock rules: a superset of the agent's (see the module docstring)."""
    here = os.path.dirname(os.path.abspath(__file__))
    read = ["read_file", "read_dir"]
    return [
        *cfg["landlock"]["fs"],
        {"path": os.path.dirname(os.__file__), "access": read},  # lazy imports, tracebacks
        {"path": here, "access": read},
        {"path": "/proc", "access": read},  # finding children to stop at exit
        {"path": os.path.dirname(cfg["report_path"]), "access": REPORT_FILE_RIGHTS},
    ]


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
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
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


# --- the forwarder: 127.0.0.1:3128 (TCP) → egress unix socket --------------------------------


def bind_listener(listen: str) -> socket.socket:
    host, _, port = listen.rpartition(":")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, int(port)))
    sock.listen(256)
    return sock


def _pump(src: socket.socket, dst: socket.socket) -> None:
    """Copy until EOF, then half-close dst so the peer sees EOF but can still answer."""
    try:
        while data := src.recv(65536):
            dst.sendall(data)
        dst.shutdown(socket.SHUT_WR)
    except OSError:  # a reset on either side ends both directions
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)


def _bridge(client: socket.socket, egress: str) -> None:
    upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        upstream.connect(egress)
    except OSError as exc:
        log(f"forwarder: cannot reach egress socket {egress}: {exc}")
        client.close()
        upstream.close()
        return
    client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # no Nagle delay on replies
    back = threading.Thread(target=_pump, args=(upstream, client), daemon=True)
    back.start()
    _pump(client, upstream)
    back.join()
    client.close()
    upstream.close()


def forward(listener: socket.socket, egress: str) -> None:
    while True:
        try:
            conn, _ = listener.accept()
        except OSError as exc:
            log(f"forwarder: accept failed: {exc}")
            time.sleep(0.05)
            continue
        threading.Thread(target=_bridge, args=(conn, egress), daemon=True).start()


# --- the agent ---------------------------------------------------------------------------------


def agent_child(cfg: dict[str, Any], abi: int, status_w: int, go_r: int) -> NoReturn:
    """Runs in the forked child; never returns."""
    try:
        os.setsid()  # own process group: signals go to the whole agent tree
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        for sig in (signal.SIGPIPE, signal.SIGXFSZ, *FORWARDED, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)  # ignored dispositions would survive exec
        os.chdir(cfg["cwd"])
        # Opened before Landlock so that the policy need not grant /proc; a read at offset 0
        # regenerates the content, so what we send is the state after restriction.
        status_fd = os.open("/proc/self/status", os.O_RDONLY | os.O_CLOEXEC)
        ll = cfg["landlock"]
        outcome = landlock.restrict(abi, ll["fs"], ll["net"], SCOPES)
        msg = {
            "landlock": asdict(outcome),
            "status": proc_status(os.pread(status_fd, 16384, 0)),
            "uid": os.getuid(),
        }
        os.write(status_w, json.dumps(msg).encode() + b"\n")
        os.close(status_w)
        if os.read(go_r, 1) != b"g":
            os._exit(0)  # PID 1 decided not to start the agent
        os.execvpe(cfg["command"][0], cfg["command"], cfg["env"])
    except BaseException as exc:
        log(f"agent: cannot start {cfg['command'][0]!r}: {exc}")
    os._exit(127)


def read_line(fd: int) -> bytes:
    buf = b""
    while not buf.endswith(b"\n") and (chunk := os.read(fd, 65536)):
        buf += chunk
    return buf


def reap(agent_pid: int) -> int | None:
    """Collect every exited child; return the agent's wait status if it was among them."""
    agent_status = None
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return agent_status
        if pid == 0:
            return agent_status
        if pid == agent_pid:
            agent_status = status


def children() -> list[int]:
    me, found = os.getpid(), []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # The comm field may hold spaces and parens: ppid is the 2nd field after the last ')'.
        if int(stat[stat.rindex(b")") + 2 :].split()[1]) == me:
            found.append(int(entry))
    return found


def stop_the_rest(grace: float) -> None:
    """After the agent: SIGTERM every remaining child, SIGKILL after `grace`, reap them all."""
    deadline, sig = time.monotonic() + grace, signal.SIGTERM
    while kids := children():
        if time.monotonic() > deadline:
            sig = signal.SIGKILL
        for pid in kids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        signal.sigtimedwait({signal.SIGCHLD}, 0.05)
        reap(-1)
        if time.monotonic() > deadline + 2:
            log(f"children left after SIGKILL: {kids}")
            return


def supervise(agent: int, cfg: dict[str, Any]) -> int:
    stop_at: float | None = None
    while True:
        info = signal.sigtimedwait({*FORWARDED, signal.SIGCHLD}, 0.5)
        if info is not None and info.si_signo in FORWARDED:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(agent, info.si_signo)
            if info.si_signo in STOPPING and stop_at is None:
                stop_at = time.monotonic() + float(cfg["stop_grace_s"])
        status = reap(agent)
        if status is not None:
            break
        if stop_at is not None and time.monotonic() > stop_at:
            log("agent ignored the stop signal: SIGKILL to its process group")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(agent, signal.SIGKILL)
            stop_at = float("inf")
    code = os.waitstatus_to_exitcode(status)
    stop_the_rest(float(cfg["exit_grace_s"]))
    return 128 - code if code < 0 else code  # killed by signal N → 128+N, like a shell


def exec_main(args: list[str]) -> NoReturn:
    """Run CMD inside the agent's Landlock domain (see the module docstring)."""
    if os.getuid() == 0 or os.geteuid() == 0:
        die(EXIT_CONFIG, "refusing to run as root: exec as the agent uid")
    extra: dict[str, str] = {}
    while args and args[0] != "--":
        if args[0] != "--env" or len(args) < 2 or "=" not in args[1]:
            die(EXIT_CONFIG, "usage: init.py exec [--env K=V]... -- CMD...")
        key, _, value = args[1].partition("=")
        extra[key] = value
        args = args[2:]
    command = args[1:]
    if not command:
        die(EXIT_CONFIG, "usage: init.py exec [--env K=V]... -- CMD...")
    cfg = load_config(os.environ.get("APPLIANCE_SANDBOX_CONFIG", DEFAULT_CONFIG))
    landlock.prctl(PR_SET_NO_NEW_PRIVS, 1)
    ll = cfg["landlock"]
    abi, why = landlock.probe_abi()
    hard = ll["compatibility"] == "hard_requirement"
    if hard and abi < int(ll["min_abi"]):
        die(EXIT_LANDLOCK, why or f"kernel Landlock ABI {abi} < required {ll['min_abi']}")
    with contextlib.suppress(OSError):
        os.chdir(cfg["cwd"])
    try:
        outcome = landlock.restrict(abi, ll["fs"], ll["net"], SCOPES)
    except ValueError as exc:
        die(EXIT_LANDLOCK, str(exc))
    if not outcome.enforced:
        if hard:
            die(EXIT_LANDLOCK, f"Landlock not enforced, {command[0]!r} not run: {outcome.error}")
        log(f"WARNING: Landlock NOT ENFORCED AT ALL (best_effort): {outcome.error}")
    try:
        os.execvpe(command[0], command, {**cfg["env"], **extra})
    except OSError as exc:
        die(127, f"cannot run {command[0]!r}: {exc}")


def main() -> int:
    if sys.argv[1:2] == ["exec"]:
        exec_main(sys.argv[2:])
    if os.getuid() == 0 or os.geteuid() == 0:
        die(
            EXIT_CONFIG,
            "refusing to run as root: the sandbox must start the supervisor as the "
            "agent uid (podman --user)",
        )
    cfg = load_config(os.environ.get("APPLIANCE_SANDBOX_CONFIG", DEFAULT_CONFIG))
    harden_self()
    if os.getpid() != 1:  # outside a PID namespace (tests): orphans still come to us
        landlock.prctl(PR_SET_CHILD_SUBREAPER, 1)
    ll, report_path = cfg["landlock"], cfg["report_path"]
    hard = ll["compatibility"] == "hard_requirement"
    try:
        listener = bind_listener(cfg["listen"])
    except (OSError, ValueError) as exc:
        die(EXIT_CONFIG, f"cannot listen on {cfg['listen']}: {exc}")
    abi, why = landlock.probe_abi()
    report = base_report(cfg, abi)

    def refuse(reason: str) -> int:
        report["landlock"]["error"] = reason
        write_report(report_path, report)
        log(f"agent NOT started (Landlock {ll['compatibility']}): {reason}")
        return EXIT_LANDLOCK

    if hard and abi < int(ll["min_abi"]):
        return refuse(why or f"kernel Landlock ABI {abi} < required {ll['min_abi']}")
    try:
        own = landlock.restrict(abi, own_rules(cfg), ll["net"], SCOPES)
    except ValueError as exc:  # a rule the kernel cannot take: refuse whatever the mode
        return refuse(str(exc))
    report["supervisor_landlock"] = asdict(own)
    if hard and not own.enforced:
        return refuse(f"supervisor: {own.error}")
    # Blocked, with handlers (a PID-namespace init drops SIG_DFL signals): taken by sigtimedwait.
    for sig in (*FORWARDED, signal.SIGCHLD):
        signal.signal(sig, lambda *_: None)
    signal.pthread_sigmask(signal.SIG_BLOCK, {*FORWARDED, signal.SIGCHLD})
    status_r, status_w = os.pipe()
    go_r, go_w = os.pipe()
    agent = os.fork()  # still single-threaded: the forwarder starts after this
    if agent == 0:
        os.close(status_r)
        os.close(go_w)
        listener.close()
        agent_child(cfg, abi, status_w, go_r)
    os.close(status_w)
    os.close(go_r)
    try:
        msg = json.loads(read_line(status_r) or b"null")
    except ValueError:
        msg = None
    if not msg:
        os.close(go_w)
        reap(agent)
        report["landlock"]["error"] = "agent setup failed before reporting"
        write_report(report_path, report)
        return EXIT_SPAWN
    status = msg["status"]
    report.update(
        landlock=msg["landlock"],
        agent_uid=msg["uid"],
        no_new_privs=int(status.get("NoNewPrivs", "0")),
        seccomp_mode=int(status.get("Seccomp", "0")),
        cap_eff=status.get("CapEff"),
        cap_bnd=status.get("CapBnd"),
        cap_prm=status.get("CapPrm"),
        cap_inh=status.get("CapInh"),
        cap_amb=status.get("CapAmb"),
    )
    agent_ll = msg["landlock"]
    if hard and not agent_ll["enforced"]:
        os.close(go_w)  # EOF: the child exits without exec
        while reap(agent) is None:
            time.sleep(0.01)
        return refuse(f"agent: {agent_ll['error']}")
    if not agent_ll["enforced"]:
        log(f"WARNING: Landlock NOT ENFORCED AT ALL (best_effort): {agent_ll['error'] or why}")
    if agent_ll["missing"] or agent_ll["skipped_paths"]:
        log(
            "WARNING: Landlock ({}): kernel ABI {} cannot enforce {}; skipped paths {}".format(
                ll["compatibility"],
                abi,
                agent_ll["missing"] or "-",
                agent_ll["skipped_paths"] or "-",
            )
        )
    report["agent_started"] = True
    write_report(report_path, report)
    threading.Thread(target=forward, args=(listener, cfg["egress_socket"]), daemon=True).start()
    os.write(go_w, b"g")
    os.close(go_w)
    return supervise(agent, cfg)


if __name__ == "__main__":
    sys.exit(main())
