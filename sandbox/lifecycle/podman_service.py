"""The service user's rootless Podman API, run by the control plane.

`podman --runtime runc system service --time=0 unix://SOCK` runs *as the service user* (rootless
storage, subuid range), and the control plane (root) talks to it with podman-py over that socket.
Root reaches the socket through DAC override; nobody else can (the runtime dir is 0700).
A running service is reused (found by its socket answering a ping); `stop` ends only the process
recorded in our pid file, after checking it still is that podman.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from sandbox.lifecycle.errors import HostNotReady, PodmanUnavailable

if TYPE_CHECKING:
    from podman import PodmanClient

DEFAULT_USER = "appliance"
SOCKET_NAME = "appliance-podman.sock"


@dataclass
class PodmanService:
    user: str = DEFAULT_USER
    socket_path: Path | None = None  # default: /run/user/<uid>/appliance-podman.sock
    log_path: Path | None = None  # default: next to the socket, .log
    podman: str = "podman"
    start_timeout_s: float = 30.0
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    # --- where things are ---------------------------------------------------------------------
    @property
    def account(self) -> pwd.struct_passwd:
        try:
            return pwd.getpwnam(self.user)
        except KeyError:
            raise HostNotReady(
                f"sandbox service user {self.user!r} does not exist",
                hint="run `sudo scripts/setup-service-user.sh` (scripts/setup.sh does it as root)",
            ) from None

    @property
    def runtime_dir(self) -> Path:
        return Path(f"/run/user/{self.account.pw_uid}")

    @property
    def socket(self) -> Path:
        return self.socket_path or self.runtime_dir / SOCKET_NAME

    @property
    def pid_file(self) -> Path:
        return self.socket.with_suffix(".pid")

    @property
    def base_url(self) -> str:
        return f"unix://{self.socket}"

    def env(self) -> dict[str, str]:
        acct = self.account
        return {
            "HOME": acct.pw_dir,
            "USER": acct.pw_name,
            "LOGNAME": acct.pw_name,
            "XDG_RUNTIME_DIR": str(self.runtime_dir),
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "LANG": "C.UTF-8",
        }

    # --- lifecycle ----------------------------------------------------------------------------
    def client(self, timeout: float = 60.0) -> PodmanClient:
        from podman import PodmanClient  # ~120 ms of imports: only when Podman is really used

        return PodmanClient(base_url=self.base_url, timeout=timeout)

    def is_running(self) -> bool:
        if not self.socket.exists():
            return False
        try:
            with self.client(timeout=3) as c:
                return bool(c.ping())
        except Exception:  # a stale socket file: refused, reset, timeout
            return False

    def start(self) -> PodmanClient:
        """Start the service (or reuse a running one) and return a client for it."""
        if self.is_running():
            return self.client()
        acct = self.account
        same_user = os.geteuid() == acct.pw_uid
        if os.geteuid() != 0 and not same_user:
            raise HostNotReady(
                f"starting podman as {self.user!r} needs root (running as uid {os.geteuid()})"
            )
        self._ensure_dirs(acct)
        self.socket.unlink(missing_ok=True)  # stale socket from a killed service
        log_path = self.log_path or self.socket.with_suffix(".log")
        argv = [
            self.podman,
            "--runtime",
            "runc",  # crun refuses the hybrid cgroup layout on these hosts
            "system",
            "service",
            "--time=0",  # never exit on idle: sandboxes and the control plane rely on it
            self.base_url,
        ]
        with open(log_path, "ab") as log:
            # user=/group=/extra_groups=[] drop root fully (no supplementary groups kept);
            # a new session so a Ctrl-C on the CLI does not take podman down mid-operation.
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=acct.pw_dir,
                env=self.env(),
                start_new_session=True,
                **(
                    {}
                    if same_user
                    else {"user": acct.pw_uid, "group": acct.pw_gid, "extra_groups": []}
                ),
            )
        with contextlib.suppress(OSError):
            os.chmod(log_path, 0o600)
        self.pid_file.write_text(f"{self._proc.pid}\n")
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise PodmanUnavailable(
                    f"podman system service exited with {self._proc.returncode}: " + _tail(log_path)
                )
            if self.is_running():
                return self.client()
            time.sleep(0.05)
        self.stop()
        raise PodmanUnavailable(
            f"podman system service did not answer on {self.socket} within "
            f"{self.start_timeout_s:.0f} s: " + _tail(log_path)
        )

    def stop(self, timeout_s: float = 10.0) -> bool:
        """Stop the service we started (pid file); True if one was stopped."""
        pid = self._proc.pid if self._proc else _read_pid(self.pid_file)
        stopped = False
        if pid and _is_podman_service(pid, self.base_url):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline and _alive(pid, self._proc):
                time.sleep(0.05)
            if _alive(pid, self._proc):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            stopped = True
        if self._proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=2)
            self._proc = None
        self.pid_file.unlink(missing_ok=True)
        self.socket.unlink(missing_ok=True)
        return stopped

    def ensure_runtime_dir(self) -> None:
        """The user's runtime dir (and the socket's), as start() makes them: for other rootless
        podman commands run as this user (the appliance's backend container)."""
        self._ensure_dirs(self.account)

    def _ensure_dirs(self, acct: pwd.struct_passwd) -> None:
        # /run is a tmpfs: the runtime dir made by setup-service-user.sh is gone after a reboot.
        rd = self.runtime_dir
        if not rd.exists():
            rd.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            rd.mkdir(mode=0o700)
            if os.geteuid() == 0:
                os.chown(rd, acct.pw_uid, acct.pw_gid)
        sock_dir = self.socket.parent
        if not sock_dir.exists():
            sock_dir.mkdir(mode=0o700, parents=True)
            if os.geteuid() == 0:
                os.chown(sock_dir, acct.pw_uid, acct.pw_gid)

    def __enter__(self) -> PodmanClient:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def ensure_ready() -> None:
    """Fail early, with the fix, when this host cannot run sandboxes at all."""
    if shutil.which("podman") is None:
        raise HostNotReady("podman is not installed", hint="run scripts/setup.sh as root")
    if os.geteuid() != 0:
        raise PodmanUnavailable(
            "sandboxes are managed by root (the control plane)", hint="use sudo"
        )


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _is_podman_service(pid: int, base_url: str) -> bool:
    # Never signal a recycled pid: the cmdline must still be our podman service on our socket.
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"service" in argv and base_url.encode() in argv


def _alive(pid: int, proc: subprocess.Popen[bytes] | None) -> bool:
    if proc is not None:
        return proc.poll() is None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _tail(path: Path, n: int = 10) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-n:])
    except OSError:
        return "(no log)"
