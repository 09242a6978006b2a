"""`appliance up`'s wait for its supervisor's verdict: every service ready, or one failed.

The supervisor gives each backend start inference.ready_timeout_s, and an out-of-memory
step-down reloads the model inside the same start (twice 10-15 min for Super on a Spark): a
fixed deadline of the same size gives up mid-load. So by default `up` waits for the verdict and
gives up only when nothing moves for ready_timeout_s (the supervisor wedged); an explicit
--timeout stays a hard limit.

Where stdout is no terminal (`appliance-up.sh | tee`, Ansible, `ssh -T`) a spinner prints
nothing: ProgressLines prints the backend's progress as lines instead.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from typing import Any

from appliance.errors import BackendError

SERVICES = ("control", "backend", "gateway")  # what the supervisor runs; `up` waits for each
LINE_EVERY_S = 5.0  # at most one progress line this often (a load reports every second)
HEARTBEAT_S = 30.0  # at least one this often, progress or not
POLL_S = 0.5

States = dict[str, str | None]
ShowFn = Callable[[States, str], None]  # (each service's state, the backend's detail)

# The supervisor prefixes a loading backend's detail with its own elapsed seconds.
_ELAPSED_PREFIX = re.compile(r"^\d+ s: ")


def backend_line(detail: str) -> str:
    """The backend's progress without the supervisor's elapsed-seconds prefix."""
    return _ELAPSED_PREFIX.sub("", detail.strip())


class ProgressLines:
    """Progress as plain lines: the backend's line whenever it changes (at most every
    `every` s), and at least every `heartbeat` s the elapsed time with the current line."""

    def __init__(
        self,
        say: Callable[[str], None],
        *,
        every: float = LINE_EVERY_S,
        heartbeat: float = HEARTBEAT_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._say, self._every, self._heartbeat, self._clock = say, every, heartbeat, clock
        self._started = clock()
        self._shown: str | None = None
        self._shown_at: float | None = None

    def __call__(self, states: States, detail: str) -> None:
        now = self._clock()
        line = f"backend {states.get('backend') or 'starting'}"
        if text := backend_line(detail):
            line += f": {text}"
        since = None if self._shown_at is None else now - self._shown_at
        changed = line != self._shown
        if since is None or (changed and since >= self._every) or since >= self._heartbeat:
            self._say(f"    {now - self._started:.0f} s: {line}")
            self._shown, self._shown_at = line, now


def wait_for_verdict(
    read: Callable[[], dict[str, Any]],
    exited: Callable[[], bool],
    show: ShowFn,
    *,
    timeout: float | None,
    stall_s: float,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> tuple[str | None, dict[str, Any]]:
    """Poll `read()` (services.json of this instance, {} until written) until every service is
    ready: (None, services); or one failed, is restarting before it was ever ready, or the
    supervisor exited: (its name or "supervisor", services). Raises BackendError past
    `timeout` (None: none) or when the services report nothing new for `stall_s`."""
    started = clock()
    seen, seen_at = "", started
    while True:
        services = read()
        states: States = {name: services.get(name, {}).get("state") for name in SERVICES}
        if all(state == "ready" for state in states.values()):
            return None, services
        # A service that must restart before it was ever ready will not get better by waiting.
        broken = [n for n, s in states.items() if s in ("failed", "restarting")]
        if exited() or broken:
            return (broken[0] if broken else "supervisor"), services
        now = clock()
        record = json.dumps({n: services.get(n) for n in SERVICES}, sort_keys=True, default=str)
        if record != seen:
            seen, seen_at = record, now
        if timeout is not None and now - started > timeout:
            raise BackendError(
                f"not ready after {timeout:.0f} s: {states}",
                hint="raise --timeout, or leave it out to wait for the supervisor's verdict",
            )
        if now - seen_at > stall_s:
            raise BackendError(
                f"no service reported anything for {stall_s:.0f} s: {states}",
                hint="see the services' logs; inference.ready_timeout_s sets this limit",
            )
        show(states, services.get("backend", {}).get("detail") or "")
        sleep(POLL_S)
