"""The per-sandbox egress proxy process: bind its socket, launch it, wait for "ready", stop it.

A mixin of `SandboxManager` (manager.py), which provides `settings`. The proxy's privileged
monitor (sandbox/proxy/monitor.py, started as `settings.monitor_argv`) runs the proxy as the
proxy user, serving the sandbox's egress socket, holding its key.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path

from sandbox.lifecycle.errors import SandboxError
from sandbox.lifecycle.layout import SandboxPaths
from sandbox.lifecycle.ports import LifecycleSettings
from sandbox.proxy.monitor import listen_unix

UNIX_PATH_MAX = 107  # sun_path is 108 bytes with the terminating NUL


class EgressProxies:
    """Start, find and stop a sandbox's egress proxy."""

    settings: LifecycleSettings

    def _proxy_running(self, paths: SandboxPaths) -> int | None:
        """The proxy's pid if it is alive: not a zombie, and not a reused pid."""
        try:
            pid = int(paths.proxy_pid.read_text())
        except (OSError, ValueError):
            return None
        with contextlib.suppress(ChildProcessError):  # ours when this process started it
            os.waitpid(pid, os.WNOHANG)
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()  # empty for a zombie
        except OSError:
            return None
        return pid if os.fsencode(paths.admin_socket) in cmdline else None

    def _start_proxy(self, name: str, paths: SandboxPaths) -> None:
        self._await_proxy(name, paths, self._spawn_proxy(name, paths))

    def _spawn_proxy(self, name: str, paths: SandboxPaths) -> subprocess.Popen[bytes] | None:
        """Bind the egress socket here, then start the proxy on it without waiting (it takes
        ~0.3 s to start: a sandbox starting meanwhile waits in the listen backlog, no failure).
        None when a proxy already runs."""
        if self._proxy_running(paths):
            return None
        egress = paths.egress / "egress.sock"
        for sock_path in (paths.admin_socket, egress):
            if len(os.fsencode(sock_path)) > UNIX_PATH_MAX:
                raise SandboxError(
                    f"{sock_path} is too long for a unix socket ({UNIX_PATH_MAX} bytes at most)",
                    hint="use a shorter state_dir (or sandbox name)",
                )
        # 0666: the egress directory (the agent uid's, 0700) guards it
        listener = listen_unix(egress, 0o666)
        settings = self.settings
        try:
            argv = [
                *settings.monitor_argv,  # the proxy's monitor, auditing to the host's log
                "--sandbox", name,
                "--socket", str(egress),
                "--socket-fd", str(listener.fileno()),
                "--policy", str(paths.policy),
                "--admin-socket", str(paths.admin_socket),
                "--gateway-url", settings.gateway_url,
                "--key-file", str(paths.key),
                "--audit-log", str(settings.audit_log),
                # the proxy itself runs as this user, with no capabilities (proxy/monitor.py)
                "--proxy-user", settings.proxy_user,
                "--max-pending", str(settings.max_pending_approvals),
            ]  # fmt: skip
            with paths.proxy_log.open("ab") as log:
                proc = subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log,
                    start_new_session=True, pass_fds=(listener.fileno(),),
                )  # fmt: skip
        finally:
            listener.close()  # the proxy has its own copy
        paths.proxy_pid.write_text(f"{proc.pid}\n")
        return proc

    def _await_proxy(
        self, name: str, paths: SandboxPaths, proc: subprocess.Popen[bytes] | None
    ) -> None:
        if proc is None:
            return
        assert proc.stdout is not None
        line = proc.stdout.readline().decode(errors="replace")  # "ready <socket>" once serving
        if not line.startswith("ready"):
            paths.proxy_pid.unlink(missing_ok=True)
            raise SandboxError(f"egress proxy for {name} did not start: {line.strip()!r}")

    def _stop_proxy(self, paths: SandboxPaths) -> None:
        pid = self._proxy_running(paths)
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
        paths.proxy_pid.unlink(missing_ok=True)
