"""A backend that is a child process serving HTTP: vLLM, or the embedded model's server.

The child runs in its own session (so its process group can be signalled as a whole: vLLM forks
engine-core and worker processes), with stdout and stderr appended to a log file whose last line
feeds the progress display while a model loads (minutes on real hardware).
With a `container` (container.py) the child is the foreground `podman run` of the appliance
image around `argv`; `argv` stays the inner command (what the OOM step-down edits).
A backend given a `warmup_model` is ready only after one tiny completion was answered: vLLM
JIT-compiles on its first request, which must not be a user's.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from hardware.secret_names import has_secret_value, is_secret_name
from inference.backends.base import (
    BackendMetrics,
    BackendStartError,
    BackendStopped,
    BackendTimeout,
    BackendUnavailable,
    ProgressCallback,
    StateCallback,
    fetch_models,
    http_get,
    parse_metrics,
    secret_flags,
)
from inference.backends.container import ContainerSpec
from inference.backends.supervisor import Probe, Supervisor
from inference.backends.warmup import warm_up

_TAIL_BYTES = 16 * 1024


class ProcessBackend:
    """Runs `argv` as a child process and talks to it over HTTP at `base_url`."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        base_url: str,
        log_path: str | Path,
        env: Mapping[str, str] | None = None,
        name: str = "backend",
        health_path: str = "/health",
        api_path: str = "/v1",
        api_key: str | None = None,
        cwd: str | Path | None = None,
        container: ContainerSpec | None = None,
        warmup_model: str | None = None,
    ) -> None:
        self.name = name
        self.container = container
        self.warmup_model = warmup_model
        self._argv = list(argv)
        self._check_argv(self._argv)
        self._base_url = base_url.rstrip("/")
        self.log_path = Path(log_path)
        self._env = dict(env or {})
        self._health_path = health_path
        self._api_path = api_path
        self._api_key = api_key
        self._cwd = cwd
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0  # where this start's output begins in the log file
        self.starts = 0

    def __repr__(self) -> str:  # no env: it may hold a key
        return f"{type(self).__name__}(name={self.name!r}, base_url={self._base_url!r})"

    @staticmethod
    def _check_argv(argv: list[str]) -> None:
        if not argv:
            raise ValueError("empty argv")
        if leaks := secret_flags(argv):
            raise ValueError(f"secrets never go in argv (visible in ps): {', '.join(leaks)}")

    # ---- what it runs ---------------------------------------------------------------------

    @property
    def argv(self) -> list[str]:
        return list(self._argv)

    @argv.setter
    def argv(self, argv: Sequence[str]) -> None:  # takes effect at the next start
        self._check_argv(list(argv))
        self._argv = list(argv)

    @property
    def env(self) -> dict[str, str]:
        """The variables set on top of the inherited environment."""
        return dict(self._env)

    def spawn_argv(self) -> list[str]:
        """What start() runs: argv, or the `podman run` around it."""
        if self.container is None:
            return list(self._argv)
        return self.container.run_argv(self._argv, self._env)

    def spawn_env(self) -> dict[str, str]:
        """The spawned process's whole environment (podman's: the account's plus the values
        its `--env=NAME` flags copy into the container)."""
        if self.container is None:
            return {**os.environ, **self._env}
        return self.container.process_env(os.environ, self._env)

    def _spawn_user(self) -> dict[str, Any]:
        return self.container.account.popen_kwargs(os.geteuid()) if self.container else {}

    def command_line(self) -> str:
        """One shell line, env first, as launched; secret env values are masked (a variable named
        like a credential, or a value that looks like one: hardware/secret_names.py)."""
        assigns = [
            f"{k}={'***' if is_secret_name(k) or has_secret_value(v) else shlex.quote(v)}"
            for k, v in sorted(self._env.items())
        ]
        return " ".join([*assigns, shlex.join(self.spawn_argv())])

    @property
    def base_url(self) -> str:
        return self._base_url

    @property
    def api_base(self) -> str:
        return self._base_url + self._api_path

    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}

    # ---- the process ----------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def returncode(self) -> int | None:
        """None while running (or never started); negative: killed by that signal."""
        return self._proc.poll() if self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        if self.running:
            raise BackendStartError(f"{self.name} is already running (pid {self.pid})")
        self._check_port_free()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            log.write(f"\n=== {stamp} start {self.name}: {self.command_line()}\n".encode())
            log.flush()
            self._log_offset = log.tell()
            argv = self.spawn_argv()
            cwd = self._cwd
            if cwd is None and self.container is not None:
                cwd = self.container.account.home
            try:
                self._proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=self.spawn_env(),
                    cwd=cwd,
                    start_new_session=True,  # its own process group: stop() reaches its children
                    **self._spawn_user(),
                )
            except OSError as exc:
                raise BackendStartError(f"cannot run {argv[0]!r}: {exc}", retryable=False) from None
        self.starts += 1

    def _check_port_free(self) -> None:
        """Refuse to start when something already answers there: its /health would fool us.
        In a container: our own container left by a supervisor killed -9 (its `podman run` is
        in a session of its own, so it outlived it) is removed first, as --replace would."""
        if self._port_in_use() and self.container is not None:
            self._podman(self.container.remove_argv(), timeout=60)
            deadline = time.monotonic() + 5  # the port is released as the process goes
            while self._port_in_use() and time.monotonic() < deadline:
                time.sleep(0.1)
        if self._port_in_use():
            port = urlsplit(self._base_url).port
            raise BackendStartError(
                f"{self.name}: port {port} is already in use (a stale server?)", retryable=True
            )

    def _port_in_use(self) -> bool:
        parts = urlsplit(self._base_url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            socket.create_connection((parts.hostname or "127.0.0.1", port), timeout=0.5).close()
        except OSError:
            return False
        return True

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM to the whole process group, SIGKILL after `grace` seconds. In a container:
        `podman stop` first (it waits `grace`), then the same for `podman run`'s group, then,
        once nothing of that group is left to create it, the container removed if it is there
        (`podman run` killed mid-create, or killed before its --rm)."""
        proc = self._proc
        if proc is None:
            return
        if self.container is not None and proc.poll() is None:
            self._podman(self.container.stop_argv(grace), timeout=grace + 30)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)  # `podman run --rm` removes the container, then exits
        if proc.poll() is None:
            self._signal_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self._signal_group(proc.pid, signal.SIGKILL)
                proc.wait()
        # Children that outlived the leader (vLLM's engine core holds GPU memory).
        self._signal_group(proc.pid, signal.SIGKILL)
        if self.container is not None:
            self._wait_group_gone(proc.pid, timeout=10)
            self._podman(self.container.remove_argv(), timeout=60)  # idempotent (--ignore)

    @staticmethod
    def _wait_group_gone(pgid: int, timeout: float) -> None:
        """Until no process of the group is left (SIGKILL is delivered, not yet acted on)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            except PermissionError:
                pass  # another user's process still in the group (the service user's podman)
            time.sleep(0.05)

    def _podman(self, argv: list[str], timeout: float) -> None:
        """One podman command as the container's account; its output goes to the log."""
        assert self.container is not None
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with (
            contextlib.suppress(OSError, subprocess.TimeoutExpired),
            self.log_path.open("ab") as log,
        ):
            subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.container.process_env(os.environ, {}),
                cwd=self.container.account.home,
                timeout=timeout,
                check=False,
                **self._spawn_user(),
            )

    @staticmethod
    def _signal_group(pgid: int, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)

    # ---- the log --------------------------------------------------------------------------

    def log_since_start(self) -> str:
        """Everything the current (or last) run wrote."""
        try:
            with self.log_path.open("rb") as log:
                log.seek(self._log_offset)
                return log.read().decode(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 20) -> str:
        try:
            with self.log_path.open("rb") as log:
                log.seek(max(self._log_offset, log.seek(0, os.SEEK_END) - _TAIL_BYTES))
                text = log.read().decode(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.replace("\r", "\n").splitlines()[-lines:])

    def last_log_line(self) -> str:
        """The latest non-empty line (tqdm bars end with \\r, not \\n)."""
        rows = [row.strip() for row in self.log_tail(5).splitlines() if row.strip()]
        return rows[-1][:200] if rows else ""

    # ---- readiness ------------------------------------------------------------------------

    def health(self, timeout: float = 2.0) -> bool:
        return self.probe(timeout) == "ok"

    def probe(self, timeout: float = 2.0) -> Probe:
        """One health check that tells busy from dead: "ok" (200); "busy" (it accepted the
        connection but did not answer in time: a long request holds its event loop); "unhealthy"
        (it answered with an error, e.g. vLLM's dead engine); "down" (nothing accepts, or the
        connection broke)."""
        try:
            response = httpx.get(self._base_url + self._health_path, timeout=timeout)
        except (httpx.ReadTimeout, httpx.WriteTimeout, httpx.PoolTimeout, httpx.ConnectTimeout):
            return "busy"  # ConnectTimeout on loopback: a full accept backlog, not a dead port
        except httpx.HTTPError:
            return "down"
        return "ok" if response.status_code == 200 else "unhealthy"

    def wait_ready(
        self,
        timeout: float,
        progress: ProgressCallback | None = None,
        cancel: threading.Event | None = None,
        interval: float = 0.25,
    ) -> None:
        """Poll /health until 200, then warm up (`warmup_model`); raise if the process exits,
        the time runs out or `cancel`."""
        started = time.monotonic()

        def check() -> None:
            if cancel is not None and cancel.is_set():
                raise BackendStopped(f"{self.name}: start cancelled")
            code = self.returncode
            if code is not None or self._proc is None:
                raise BackendStartError(
                    f"{self.name} exited with code {code} while starting: {self.last_log_line()}",
                    log_tail=self.log_tail(),
                    returncode=code,
                )
            if time.monotonic() - started >= timeout:
                raise BackendTimeout(
                    f"{self.name} not healthy after {timeout:.0f} s: {self.last_log_line()}",
                    log_tail=self.log_tail(),
                )

        while True:
            check()
            if self.health():
                break
            if progress is not None:
                progress(time.monotonic() - started, self.progress_line())
            if cancel is not None:
                cancel.wait(interval)
            else:
                time.sleep(interval)
        if self.warmup_model is None:
            return
        warm_up(
            self.api_base,
            self.warmup_model,
            self.auth_headers(),
            timeout=max(1.0, timeout - (time.monotonic() - started)),
            check=check,
            report=lambda line: progress(time.monotonic() - started, line) if progress else None,
            interval=interval,
        )

    def progress_line(self) -> str:
        """What the progress display shows while starting: the log's latest line."""
        return self.last_log_line()

    def launch(
        self,
        timeout: float,
        progress: ProgressCallback | None = None,
        cancel: threading.Event | None = None,
    ) -> None:
        """start() + wait_ready(); on failure nothing is left running."""
        self.start()
        try:
            self.wait_ready(timeout, progress, cancel)
        except BaseException:
            self.stop(grace=5.0)
            raise

    # ---- what it serves -------------------------------------------------------------------

    def models(self) -> list[dict[str, Any]]:
        return fetch_models(self.api_base, self.auth_headers())

    def metrics(self) -> BackendMetrics:
        """One scrape of /metrics; an empty BackendMetrics if the server has none."""
        try:
            text = http_get(self._base_url + "/metrics").text
        except BackendUnavailable:
            if not self.running:
                raise
            return BackendMetrics(scraped_at=time.monotonic())
        return parse_metrics(text)

    def supervise(self, on_state: StateCallback | None = None, **options: Any) -> Supervisor:
        """Start a Supervisor thread that keeps this backend up (options: see Supervisor)."""
        return Supervisor(self, on_state=on_state, **options).start()
