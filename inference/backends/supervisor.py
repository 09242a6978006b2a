"""Keep a process backend up: start it, watch it, restart it with exponential backoff.

States: starting -> ready -> (dies or turns unhealthy) -> restarting -> starting -> ...;
`failed` when a start cannot succeed (not retryable, or too many failed starts in a row);
`stopped` after stop(). Every transition goes to the `on_state(state, why)` callback.

Busy is not dead. A backend whose process is alive and whose port accepts connections, but whose
/health does not answer in time, is busy (a huge request holds its event loop): it stays `ready`
with a "busy" detail and is not restarted, unless it stays silent for `hung_after` seconds (hung).
Dead is: the process exited, /health answers an error (vLLM: engine dead), or nothing accepts
connections on its port, `unhealthy_after` checks in a row. Each restart is logged with its reason
(WARNING) and the last RESTART_HISTORY are kept in `recent_restarts`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from inference.backends.base import (
    BackendStartError,
    BackendState,
    BackendStopped,
    ProgressCallback,
    StateCallback,
)

log = logging.getLogger(__name__)

Probe = Literal["ok", "busy", "unhealthy", "down"]
RESTART_HISTORY = 5


class Launchable(Protocol):
    name: str

    @property
    def returncode(self) -> int | None: ...

    def launch(
        self,
        timeout: float,
        progress: ProgressCallback | None = None,
        cancel: threading.Event | None = None,
    ) -> None: ...

    def health(self, timeout: float = 2.0) -> bool: ...

    def probe(self, timeout: float = 2.0) -> Probe: ...

    def stop(self, grace: float = 10.0) -> None: ...


@dataclass
class Backoff:
    """1, 2, 4 ... seconds, capped; reset() after the backend has stayed healthy."""

    initial: float = 1.0
    cap: float = 60.0
    factor: float = 2.0
    _next: float = field(init=False, default=0.0)

    def __post_init__(self) -> None:
        self._next = self.initial

    def next(self) -> float:
        delay = self._next
        self._next = min(self.cap, self._next * self.factor)
        return delay

    def reset(self) -> None:
        self._next = self.initial


class Supervisor:
    """Runs in its own thread (start()) or in the caller's (run()); only it touches the backend."""

    def __init__(
        self,
        backend: Launchable,
        *,
        on_state: StateCallback | None = None,
        progress: ProgressCallback | None = None,
        ready_timeout: float = 1800.0,  # real model loads take 10-15 minutes
        backoff: Backoff | None = None,
        stable_after: float = 300.0,  # healthy this long -> the backoff starts over
        check_interval: float = 2.0,
        unhealthy_after: int = 3,  # failed health checks in a row -> restart (engine dead)
        hung_after: float = 300.0,  # busy (alive, port open, /health silent) this long -> restart
        max_failed_starts: int | None = 10,
        stop_grace: float = 30.0,
    ) -> None:
        self.backend = backend
        self._on_state = on_state
        self._progress = progress
        self._ready_timeout = ready_timeout
        self.backoff = backoff or Backoff()
        self._stable_after = stable_after
        self._check_interval = check_interval
        self._unhealthy_after = unhealthy_after
        self._hung_after = hung_after
        self._max_failed_starts = max_failed_starts
        self._stop_grace = stop_grace
        self._stop = threading.Event()
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None
        self.state: BackendState = "stopped"
        self.detail = ""
        self.restarts = 0
        self._history: deque[dict[str, Any]] = deque(maxlen=RESTART_HISTORY)

    @property
    def recent_restarts(self) -> list[dict[str, Any]]:
        """The last RESTART_HISTORY restarts, oldest first: {"at": epoch s, "reason", "restart"}."""
        return list(self._history)

    # ---- control --------------------------------------------------------------------------

    def start(self) -> Supervisor:
        self._thread = threading.Thread(
            target=self.run, name=f"supervise-{self.backend.name}", daemon=True
        )
        self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Stop supervising and stop the backend (the supervising thread does it)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def wait_for(self, *states: BackendState, timeout: float | None = None) -> bool:
        """Block until the state is one of `states`; False on timeout."""
        with self._changed:
            return self._changed.wait_for(lambda: self.state in states, timeout)

    # ---- the loop -------------------------------------------------------------------------

    def _set(self, state: BackendState, detail: str = "") -> None:
        with self._changed:
            self.state, self.detail = state, detail
            self._changed.notify_all()
        log.info("%s: %s %s", self.backend.name, state, detail)
        if self._on_state is not None:
            try:
                self._on_state(state, detail)
            except Exception:  # a broken display must not take the backend down
                log.exception("state callback failed")

    def run(self) -> None:
        failed_starts = 0
        try:
            while not self._stop.is_set():
                self._set("starting", f"start #{self.restarts + 1}")
                try:
                    self.backend.launch(self._ready_timeout, self._progress, self._stop)
                except BackendStopped:
                    break
                except BackendStartError as exc:
                    failed_starts += 1
                    limit = self._max_failed_starts
                    if not exc.retryable or (limit is not None and failed_starts >= limit):
                        self._set("failed", str(exc))
                        return
                    if not self._pause(f"start failed: {exc}"):
                        break
                    continue
                except Exception as exc:  # a bug or a broken setup: retrying would spin
                    self._set("failed", f"{type(exc).__name__}: {exc}")
                    return
                failed_starts = 0
                self._set("ready")
                why = self._watch()
                if why is None:
                    break
                self.backend.stop(grace=5.0)  # whatever is left of its process group
                if not self._pause(why):
                    break
        finally:
            self.backend.stop(grace=self._stop_grace)
            if self.state != "failed":
                self._set("stopped")

    def _watch(self) -> str | None:
        """Watch a ready backend; why it must be restarted, or None when told to stop."""
        ready_since, misses, busy_since = time.monotonic(), 0, None
        while not self._stop.wait(self._check_interval):
            code = self.backend.returncode
            if code is not None:
                return f"exited with code {code}"
            probe = self.backend.probe()
            now = time.monotonic()
            if probe == "busy":
                misses = 0
                if busy_since is None:
                    busy_since = now
                    self._set("ready", "busy: /health is slow (process alive, port open)")
                elif now - busy_since >= self._hung_after:
                    return f"hung: /health silent for {now - busy_since:.0f} s (process alive)"
                continue
            if busy_since is not None:
                busy_since = None
                self._set("ready")
            misses = 0 if probe == "ok" else misses + 1
            if misses >= self._unhealthy_after:
                return f"unhealthy: {misses} failed health checks in a row ({probe})"
            if now - ready_since >= self._stable_after:
                self.backoff.reset()
        return None

    def _pause(self, why: str) -> bool:
        """Report `restarting`, wait out the backoff; False if told to stop meanwhile."""
        delay = self.backoff.next()
        self.restarts += 1
        self._history.append({"at": round(time.time(), 3), "reason": why, "restart": self.restarts})
        log.warning("%s: restart #%d: %s", self.backend.name, self.restarts, why)
        self._set("restarting", f"{why}; restart in {delay:g} s")
        return not self._stop.wait(delay)
