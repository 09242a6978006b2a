"""A temp tree in which the in-sandbox supervisor runs for real on this host, as a non-root uid,
no Podman needed: what tests/integration/test_sandbox_supervisor.py and
test_supervisor_runtime.py share.

Landlock works unprivileged once no_new_privs is set, so the enforcement seen here is the
kernel's, not a simulation. Tests running as root start the supervisor through
`setpriv --reuid 1000` so that the real non-root path is exercised; with `pid_ns=True` (root
only) through `unshare --pid --fork --mount-proc` too, so that it is PID 1 of its own pid
namespace as in a sandbox (the agent socket's peer rule needs that). The tree models the
sandbox's mounts' ownership: the workspace, report and agent-socket directories are the agent
uid's, the config directory (sandbox.json, the check-in file) is root's.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from sandbox.supervisor.landlock import probe_abi
from tests.helpers import free_port

REPO = Path(__file__).resolve().parents[2]
SUPERVISOR = REPO / "sandbox" / "supervisor"
PY = "/usr/bin/python3"  # the system Python: readable by any uid, unlike one under /root
AGENT_UID = 1000
AS_ROOT = os.getuid() == 0
ABI, _ = probe_abi()
# Why these tests cannot run here (the test modules skip), or None.
UNUSABLE = (
    "needs /usr/bin/python3, Landlock and setpriv"
    if not os.path.exists(PY) or ABI < 1 or (AS_ROOT and not shutil.which("setpriv"))
    else None
)

# Why PID 1-of-a-namespace tests cannot run here, or None.
NO_PID_NS = None if AS_ROOT and shutil.which("unshare") else "needs root and unshare(1)"
PID_NS = ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"]

T = TypeVar("T")
FAST = {"backoff_initial_s": 0.2, "backoff_max_s": 0.4, "healthy_after_s": 30}
# The runtime writes its pid to ws/pids, one line per start, then sleeps.
SLEEPER = """
    import os, time
    with open(os.path.join(os.environ["WS"], "pids"), "a") as f: f.write(f"{os.getpid()}\\n")
    time.sleep(60)
"""

RW = [
    "read_file",
    "read_dir",
    "write_file",
    "make_reg",
    "make_dir",
    "remove_file",
    "remove_dir",
    "truncate",
]


class Box:
    """A temp tree the agent uid can reach: supervisor copy, workspace, secret, report, the
    agent socket's directory and a root-owned config directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.sup = root / "opt" / "supervisor"
        shutil.copytree(SUPERVISOR, self.sup)  # like the read-only mount in the sandbox
        self.ws, self.secret_dir, self.report_dir = root / "ws", root / "secret", root / "report"
        self.sock_dir, self.config_dir = root / "sock", root / "config"
        for d in (self.ws, self.secret_dir, self.report_dir, self.sock_dir, self.config_dir):
            d.mkdir()
        self.secret = self.secret_dir / "secret.txt"
        self.secret.write_text("top secret\n")  # world-readable: only Landlock stands in the way
        self.socket = root / "egress.sock"
        self.agent_socket = self.sock_dir / "agent.sock"
        self.checkin = self.config_dir / "checkin"
        self.runtime_env = self.config_dir / "runtime-env.json"
        self.port = free_port()
        self.started: list[subprocess.Popen[str]] = []
        for p in [root, *root.rglob("*")]:
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
        self.sock_dir.chmod(0o700)  # like paths.sock: the agent uid's alone
        if AS_ROOT:
            for d in (self.ws, self.report_dir, self.sock_dir):
                os.chown(d, AGENT_UID, AGENT_UID)

    @property
    def report(self) -> dict[str, Any]:
        return json.loads((self.report_dir / "enforcement.json").read_text())

    def config(self, code: str, service: dict[str, Any] | None = None, **landlock: Any) -> Path:
        """sandbox.json running `code` as the agent; `service` adds top-level keys (runtime,
        checkin, agent_socket, ...); `landlock` replaces keys of the Landlock section."""
        ll = {
            "compatibility": "hard_requirement",
            "min_abi": 1,
            "fs": [
                {"path": "/usr", "access": ["read_file", "read_dir", "execute"]},
                {"path": str(self.ws), "access": RW},
            ],
            "net": {"connect_tcp": [self.port], "bind_tcp": []},
        }
        ll.update(landlock)
        cfg = {
            "command": [PY, "-I", "-c", textwrap.dedent(code)],
            "cwd": str(self.ws),
            "env": {
                "PATH": "/usr/bin:/bin",
                "PORT": str(self.port),
                "WS": str(self.ws),
                "SECRET": str(self.secret),
            },
            "listen": f"127.0.0.1:{self.port}",
            "egress_socket": str(self.socket),
            "report_path": str(self.report_dir / "enforcement.json"),
            "stop_grace_s": 0.5,
            "exit_grace_s": 0.5,
            "landlock": ll,
            **(service or {}),
        }
        path = self.config_dir / "sandbox.json"
        path.write_text(json.dumps(cfg))
        os.chmod(path, 0o644)
        return path

    def argv(self, as_agent: bool = True, pid_ns: bool = False) -> list[str]:
        pre = ["setpriv", f"--reuid={AGENT_UID}", f"--regid={AGENT_UID}", "--clear-groups"]
        return [
            *(PID_NS if pid_ns else []),
            *(pre if AS_ROOT and as_agent else []),
            *[PY, "-I", str(self.sup / "init.py")],
        ]

    def popen(
        self, cfg: Path, as_agent: bool = True, pid_ns: bool = False
    ) -> subprocess.Popen[str]:
        env = {"APPLIANCE_SANDBOX_CONFIG": str(cfg), "PATH": "/usr/bin:/bin"}
        return subprocess.Popen(
            self.argv(as_agent, pid_ns),
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )

    def start(self, cfg: Path, pid_ns: bool = False) -> subprocess.Popen[str]:
        """A supervisor left running: stopped (with its runtime) when the box is cleaned up."""
        self.started.append(self.popen(cfg, pid_ns=pid_ns))
        return self.started[-1]

    def run(self, code: str, timeout: float = 20, **landlock: Any) -> tuple[int, str, str]:
        proc = self.popen(self.config(code, **landlock))
        out, err = proc.communicate(timeout=timeout)
        return proc.returncode, out, err


@contextmanager
def made_box() -> Iterator[Box]:
    root = Path(tempfile.mkdtemp(prefix="supervisor-test-", dir="/tmp"))
    box = Box(root)
    try:
        yield box
    finally:
        for proc in box.started:
            if proc.poll() is None:
                signal_supervisor(proc, signal.SIGTERM)
                try:
                    proc.communicate(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.communicate()
        shutil.rmtree(root, ignore_errors=True)


# -- waiting on an always-on runtime -------------------------------------------------------------


def wait_for(what: str, check: Callable[[], T | None], timeout: float = 5.0) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (got := check()) is not None and got is not False:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def runtime_state(box: Box) -> dict[str, Any] | None:
    try:
        return box.report.get("runtime")
    except (OSError, ValueError):  # not written yet
        return None


def in_state(box: Box, state: str, timeout: float = 5.0) -> dict[str, Any]:
    """The report's runtime section, once it shows `state`."""
    return wait_for(state, lambda: (r := runtime_state(box)) and r["state"] == state and r, timeout)


def pids(box: Box) -> list[int]:
    path = box.ws / "pids"
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def started_pid(box: Box, n: int, timeout: float = 5.0) -> int:
    """The pid of the runtime's n-th start (1-based), once it has started and said so."""
    return wait_for(
        f"start {n}", lambda: pids(box)[n - 1] if len(pids(box)) >= n else None, timeout
    )


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def check_in(box: Box) -> float:
    """What the control plane does: rewrite the check-in file (root-owned, like the host's)."""
    tmp = box.config_dir / "checkin.tmp"
    tmp.write_text(f"{time.time()}\n")
    tmp.chmod(0o644)
    os.replace(tmp, box.checkin)
    return time.monotonic()


def supervisor_pid(proc: subprocess.Popen[str]) -> int:
    """The supervisor's pid (on this host's side): under unshare(1), its only child."""
    if proc.args[0] != PID_NS[0]:  # type: ignore[index]
        return proc.pid
    kids = f"/proc/{proc.pid}/task/{proc.pid}/children"
    first = wait_for("the supervisor under unshare", lambda: Path(kids).read_text().split())[0]
    return int(first)


def signal_supervisor(proc: subprocess.Popen[str], sig: int) -> None:
    """What a container stop does. unshare(1) neither forwards nor acts on SIGTERM: the
    supervisor gets it directly."""
    with contextlib.suppress(ProcessLookupError, FileNotFoundError, AssertionError):
        os.kill(supervisor_pid(proc), sig)


def stop(proc: subprocess.Popen[str]) -> tuple[int, str]:
    signal_supervisor(proc, signal.SIGTERM)
    _out, err = proc.communicate(timeout=10)
    return proc.returncode, err
