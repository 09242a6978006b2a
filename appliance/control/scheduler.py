"""Blueprint schedules, run by the control plane (never by the agent): a thread of the plane.

Every TICK_S the scheduler reads each agent's current deployment's `schedule:` entries
(DeployedBlueprints, cached per deployment) and starts the due ones as turns through the turn
service (`trigger="schedule"`, acting as the system principal `scheduler`), each in a thread of
its own, consumed to the end. A run is skipped, with its reason, when it falls outside the
entry's active hours, when the same entry's previous run still runs, when MAX_RUNNING scheduled
turns run already, or when the turn service refuses it (held, stopped, over budget, runtime
down: `turns.start` gates the turn and records the refusal in the transcript and the audit log,
as for a manual turn). Every run and skip goes to the store (schedule_state: next and last run
with its outcome, last skip with its reason) and to the audit log (`schedule.run`,
`schedule.skipped`).

Runs missed while the control plane was down are not replayed: an entry's first next run in
this process is computed from now, whatever the store says it was.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Protocol

from appliance.errors import TurnRefused
from blueprints.schedule import ScheduleEntry, in_active_hours, next_run

if TYPE_CHECKING:
    from appliance.control.api.deps import Principal
    from appliance.store.schedule_store import Outcome, ScheduleStore

log = logging.getLogger(__name__)

TICK_S = 2.0  # a 1-minute `every` fires within a tick of its time
MAX_RUNNING = 8  # scheduled turns at once, over all agents (each holds a thread)


@dataclass(frozen=True)
class Entry:
    """One `schedule:` entry of an agent's current deployment."""

    agent: str
    index: int
    spec: ScheduleEntry

    @property
    def key(self) -> str:
        """The entry as deployed and its index, hashed: a changed entry is a new one. Computed
        once: the scheduler asks for it on every tick."""
        return _entry_key(self.index, self.spec)

    @property
    def session(self) -> str:
        return self.spec.session or f"schedule-{self.index}"  # the blueprint fills it in

    def describe(self) -> dict[str, Any]:
        """The entry as `agent schedule` shows it."""
        return {
            "index": self.index,
            **self.spec.model_dump(mode="json", include={"every", "cron", "tz", "active_hours"}),
            "prompt": self.spec.prompt,
            "session": self.session,
        }


@lru_cache(maxsize=4096)
def _entry_key(index: int, spec: ScheduleEntry) -> str:  # entries are frozen: hashable
    text = json.dumps({"index": index, "entry": spec.model_dump(mode="json")}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class TurnEvents(Protocol):
    """A started turn's events (appliance/control/turn_events.py TurnEvents)."""

    def __iter__(self) -> Iterator[dict[str, Any]]: ...
    def __next__(self) -> dict[str, Any]: ...
    def close(self) -> None: ...


class Turns(Protocol):
    """What the scheduler needs of the turn service (appliance/control/turns.py)."""

    def start(
        self, who: Principal, name: str, message: str, session: str | None, trigger: str = ...
    ) -> TurnEvents:
        """The turn gated now: TurnRefused (recorded by the service) before any event."""
        ...


Clock = Callable[[], datetime]
Audit = Callable[..., None]


def utcnow() -> datetime:
    return datetime.now(UTC)


def system_principal(name: str) -> Principal:
    """The plane acting on its own (no operator behind it): audited as actor `name`, kind
    `system`."""
    from appliance.control.api.deps import Principal

    return Principal("system", name, "operator")


def _hours(spec: ScheduleEntry) -> str:
    hours = spec.active_hours
    return f"{hours.start}-{hours.end} {spec.tz}" if hours is not None else spec.tz


class Scheduler:
    def __init__(
        self,
        entries: Callable[[], list[Entry]],
        turns: Callable[[], Turns],
        store: ScheduleStore,
        audit: Audit,
        *,
        clock: Clock = utcnow,
        max_running: int = MAX_RUNNING,
    ) -> None:
        self.entries = entries
        self.turns = turns  # looked up per run: the plane builds its turn service on first use
        self.store = store
        self.audit = audit
        self.clock = clock
        self.max_running = max_running
        self.who = system_principal("scheduler")
        self._next: dict[tuple[str, str], datetime] = {}  # this process's plan, per entry
        self._anchor: dict[tuple[str, str], datetime] = {}  # when this process first saw it
        self._running: dict[tuple[str, str], datetime] = {}  # started at, per entry
        self._threads: set[threading.Thread] = set()
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._kept: dict[str, set[str]] | None = None
        # A run the last control plane left `running` died with it.
        store.interrupted("the control plane stopped during the run")

    # -- the loop ----------------------------------------------------------------------------

    def run(self, stop: threading.Event, interval: float = TICK_S) -> None:
        """Tick until `stop` (or `stop()`); never raises."""
        while not (stop.is_set() or self._stopped.is_set()):
            try:
                self.tick()
            except Exception:  # the store locked, a catalog gone: try again next tick
                log.exception("scheduler tick failed")
            if stop.wait(interval):
                return

    def stop(self) -> None:
        """No new runs from now on (turns already running go on until they end or are cut)."""
        self._stopped.set()

    def close(self, wait_s: float = 2.0) -> None:
        """Stopped, the running turns given `wait_s` to record their end, the store closed."""
        self.stop()
        self.wait_idle(wait_s)
        self.store.close()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait for the running turns' threads (tests, and a shutdown that can afford it)."""
        with self._lock:
            threads = list(self._threads)
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in threads:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in threads)

    def tick(self) -> None:
        now = self.clock()
        entries = self.entries()
        self._forget_gone(entries)
        for entry in entries:
            if self._stopped.is_set():
                return
            ident = (entry.agent, entry.key)
            due = self._next.get(ident)
            if due is None:  # first seen in this process: from now, missed runs not replayed
                self._anchor[ident] = now  # `every` keeps a steady grid from here
                self._plan(entry, now)
                continue
            if now < due:
                continue
            # The next one after now, not after `due`: a stalled tick does not fire a burst.
            self._plan(entry, now)
            self._fire(entry, now)

    # -- one entry ---------------------------------------------------------------------------

    def _plan(self, entry: Entry, now: datetime) -> None:
        ident = (entry.agent, entry.key)
        self._next[ident] = when = next_run(entry.spec, now, self._anchor[ident])
        self.store.planned(entry.agent, entry.key, entry.index, when.timestamp())

    def _forget_gone(self, entries: list[Entry]) -> None:
        kept: dict[str, set[str]] = {}
        for entry in entries:
            kept.setdefault(entry.agent, set()).add(entry.key)
        if kept == self._kept:
            return
        self.store.retain(kept)  # an agent removed, or upgraded to another schedule
        self._next = {i: t for i, t in self._next.items() if i[1] in kept.get(i[0], ())}
        self._anchor = {i: t for i, t in self._anchor.items() if i in self._next}
        self._kept = kept

    def _fire(self, entry: Entry, now: datetime) -> None:
        ident = (entry.agent, entry.key)
        if not in_active_hours(entry.spec, now):
            self._skip(entry, now, f"outside active hours ({_hours(entry.spec)})")
            return
        refusal = self._refusal(entry.agent)  # first: under a hold, a skip names the hold
        with self._lock:
            running_since = self._running.get(ident)
            full = len(self._running) >= self.max_running
            if running_since is None and not full:
                self._running[ident] = now  # reserved before the start: no second run slips in
        if refusal is not None and (running_since is not None or full):
            self._skip(entry, now, refusal)  # (with a free slot, start() records the refusal)
            return
        if running_since is not None:
            since = running_since.strftime("%H:%M:%SZ")
            self._skip(entry, now, f"the previous run (started {since}) is still running")
            return
        if full:
            self._skip(entry, now, f"{self.max_running} scheduled turns are running already")
            return
        try:  # gated here, once: a refusal is in the transcript and the audit log already
            events = self.turns().start(
                self.who, entry.agent, entry.spec.prompt, entry.session, trigger="schedule"
            )
        except Exception as exc:  # TurnRefused (held, stopped, over budget), or the agent gone
            self._release(ident)
            if not isinstance(exc, TurnRefused):
                log.warning("scheduled turn of %s not started: %s", entry.agent, _reason(exc))
            self._skip(entry, now, _reason(exc))
            return
        self.store.started(entry.agent, entry.key, now.timestamp())
        self.audit("schedule.run", **self._fields(entry), **self.who.audit_fields())
        thread = threading.Thread(
            target=self._turn,
            args=(events, entry, now),
            name=f"schedule-{entry.agent}-{entry.index}",
            daemon=True,  # a shutdown parks the sandbox under it; it does not wait for it
        )
        with self._lock:
            self._threads.add(thread)
        thread.start()

    def _turn(self, events: TurnEvents, entry: Entry, started: datetime) -> None:
        ident = (entry.agent, entry.key)
        outcome: Outcome = "ok"
        reason: str | None = None
        try:
            done: dict[str, Any] = {}
            with closing(events):
                for event in events:  # to the end: the turn's record is written when it ends
                    if event.get("type") == "done":
                        done = event
            if done.get("cancelled"):
                outcome, reason = "cancelled", done.get("error") or "cancelled"
            elif done.get("ok") is False:
                outcome, reason = "failed", done.get("error") or "the turn failed"
        except Exception as exc:
            outcome, reason = "failed", _reason(exc)
            log.warning("scheduled turn of %s failed: %s", entry.agent, reason)
        finally:
            self._release(ident)
            with self._lock:
                self._threads.discard(threading.current_thread())
        try:
            self.store.finished(entry.agent, entry.key, started.timestamp(), outcome, reason)
        except Exception as exc:  # closed at shutdown: the next start marks it interrupted
            log.warning("scheduled turn of %s ended (%s) unrecorded: %s", entry.agent, outcome, exc)

    def _refusal(self, agent: str) -> str | None:
        """Why the turn service's gate refuses the agent's turn now (it records nothing)."""
        try:
            self.turns().gate(agent)
        except TurnRefused as exc:
            return _reason(exc)
        except Exception:  # an agent gone, say: start() says so, and records it
            return None
        return None

    def _release(self, ident: tuple[str, str]) -> None:
        with self._lock:
            self._running.pop(ident, None)

    def _skip(self, entry: Entry, now: datetime, reason: str) -> None:
        self.store.skipped(entry.agent, entry.key, now.timestamp(), reason)
        self.audit(
            "schedule.skipped", **self._fields(entry), reason=reason, **self.who.audit_fields()
        )
        log.info("schedule of %s (entry %d) skipped: %s", entry.agent, entry.index, reason)

    @staticmethod
    def _fields(entry: Entry) -> dict[str, Any]:
        return {"agent": entry.agent, "entry": entry.index, "session": entry.session}


def _reason(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__
