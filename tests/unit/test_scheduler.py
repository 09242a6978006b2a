"""The control plane's scheduler (appliance/control/scheduler.py) on a fake clock and a fake turn
service, with the real schedule store: a due entry runs as a `schedule` turn by the `scheduler`
principal; an overlapping run, a refused turn and a run outside active hours are skipped with
their reason (store and audit), a refused one through the turn service (which records it in the
transcript); the gate is asked first (it records nothing), so a skip under a hold names the hold,
not the overlap; a skip does not hide the outcome of the run it overlapped; runs missed while the
control plane was down are not replayed."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from appliance.control.scheduler import Entry, Scheduler
from appliance.errors import TurnRefused
from appliance.store.schedule_store import ScheduleStore
from blueprints.schedule import ScheduleEntry

T0 = datetime(2026, 12, 7, 10, 0, 0, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now

    def at(self, seconds: float) -> None:
        self.now = T0 + timedelta(seconds=seconds)


class FakeTurns:
    """start() refuses the names in `refused` (as TurnService does: the refusal recorded, as
    in its transcript, then TurnRefused); else it records the call and returns the events,
    which wait for `release` when `block` is set, and fail when `fail` is set."""

    def __init__(self) -> None:
        self.refused: dict[str, str] = {}
        self.refusals: list[dict[str, Any]] = []  # the transcript's refused lines
        self.calls: list[dict[str, Any]] = []
        self.block = False
        self.release = threading.Event()
        self.started = threading.Event()
        self.fail: str | None = None
        self.done: dict[str, Any] = {"type": "done", "ok": True}

    def start(
        self, who: Any, name: str, message: str, session: str | None, trigger: str = "manual"
    ) -> Iterator[dict[str, Any]]:
        call = {"who": who, "name": name, "message": message, "session": session}
        call["trigger"] = trigger
        if name in self.refused:
            self.refusals.append({**call, "refused": self.refused[name]})
            raise TurnRefused(self.refused[name])
        self.calls.append(call)
        return self._events()

    def gate(self, name: str) -> None:  # records nothing, as TurnService.gate
        if name in self.refused:
            raise TurnRefused(self.refused[name])

    def _events(self) -> Iterator[dict[str, Any]]:
        self.started.set()
        if self.block:
            assert self.release.wait(10)
        if self.fail:
            raise RuntimeError(self.fail)
        yield {"type": "delta", "text": "hi"}
        yield self.done


class Rig:
    def __init__(self, tmp_path: Path, schedule: list[dict[str, Any]], agent: str = "a1") -> None:
        self.clock = Clock()
        self.turns = FakeTurns()
        self.audit: list[tuple[str, dict[str, Any]]] = []
        self.store = ScheduleStore(tmp_path)
        self.set_schedule(schedule, agent)
        self.scheduler = self.new_scheduler()

    def set_schedule(self, schedule: list[dict[str, Any]], agent: str = "a1") -> None:
        self.entries = [
            Entry(agent, i, ScheduleEntry(**{"session": f"schedule-{i}", **spec}))
            for i, spec in enumerate(schedule)
        ]

    def new_scheduler(self) -> Scheduler:
        return Scheduler(
            lambda: self.entries,
            lambda: self.turns,
            self.store,
            lambda event, **fields: self.audit.append((event, fields)),
            clock=self.clock,
        )

    def tick_at(self, seconds: float) -> None:
        self.clock.at(seconds)
        self.scheduler.tick()

    def row(self, index: int = 0) -> Any:
        [row] = [s for s in self.store.states() if s.entry_index == index]
        return row

    def events(self, name: str) -> list[dict[str, Any]]:
        return [fields for event, fields in self.audit if event == name]


EVERY_MINUTE = [{"every": "1m", "prompt": "check the inbox"}]


def test_a_due_entry_runs_as_a_schedule_turn_by_the_scheduler(tmp_path: Path) -> None:
    rig = Rig(tmp_path, EVERY_MINUTE)
    rig.tick_at(0)  # first seen: planned a minute from now, nothing run
    assert rig.row().next_run_at == (T0 + timedelta(minutes=1)).timestamp()
    rig.tick_at(59)
    assert rig.turns.calls == []
    rig.tick_at(61)
    assert rig.scheduler.wait_idle(5)
    [call] = rig.turns.calls
    assert call["trigger"] == "schedule" and call["name"] == "a1"
    assert call["message"] == "check the inbox" and call["session"] == "schedule-0"
    assert (call["who"].kind, call["who"].name) == ("system", "scheduler")
    row = rig.row()
    assert (row.last_outcome, row.last_reason, row.runs, row.skips) == ("ok", None, 1, 0)
    assert row.last_run_at == (T0 + timedelta(seconds=61)).timestamp()
    assert row.next_run_at == (T0 + timedelta(minutes=2)).timestamp()  # the grid, not +61 s
    [run] = rig.events("schedule.run")
    assert run["agent"] == "a1" and run["entry"] == 0 and run["session"] == "schedule-0"
    assert run["actor"] == "scheduler" and run["actor_kind"] == "system"
    rig.tick_at(62)  # not due again until 10:02
    assert len(rig.turns.calls) == 1


def test_a_run_while_the_previous_one_runs_is_skipped(tmp_path: Path) -> None:
    rig = Rig(tmp_path, EVERY_MINUTE)
    rig.turns.block = True
    rig.tick_at(0)
    rig.tick_at(60)
    assert rig.turns.started.wait(5)
    assert rig.row().last_outcome == "running"
    rig.tick_at(120)  # the first still runs
    assert len(rig.turns.calls) == 1
    row = rig.row()
    assert (row.last_run_at, row.last_outcome) == (
        (T0 + timedelta(minutes=1)).timestamp(),
        "running",
    )
    assert row.last_skip_at == (T0 + timedelta(minutes=2)).timestamp()
    assert row.last_skip_reason == "the previous run (started 10:01:00Z) is still running"
    assert row.skips == 1 and row.runs == 1
    [skipped] = rig.events("schedule.skipped")
    assert skipped["reason"] == row.last_skip_reason and skipped["actor"] == "scheduler"
    rig.turns.release.set()
    assert rig.scheduler.wait_idle(5)
    row = rig.row()  # the overlapped run's outcome is recorded, the skip kept beside it
    assert (row.last_run_at, row.last_outcome, row.last_reason) == (
        (T0 + timedelta(minutes=1)).timestamp(),
        "ok",
        None,
    )
    assert row.last_skip_reason == "the previous run (started 10:01:00Z) is still running"
    rig.tick_at(180)  # free again: runs
    assert rig.scheduler.wait_idle(5)
    assert len(rig.turns.calls) == 2 and rig.row().last_outcome == "ok"


def test_under_a_hold_a_run_overlapping_the_cut_one_names_the_hold(tmp_path: Path) -> None:
    """The gate before the overlap: the kill switch cut the run in flight (it is still ending)
    and holds; the next skip says so, not that the previous run is still running."""
    rig = Rig(tmp_path, EVERY_MINUTE)
    rig.turns.block = True
    rig.tick_at(0)
    rig.tick_at(60)
    assert rig.turns.started.wait(5)
    rig.turns.refused["a1"] = "a1 is held by the kill switch: drill"
    rig.tick_at(120)
    assert rig.row().last_skip_reason == "a1 is held by the kill switch: drill"
    assert len(rig.turns.calls) == 1
    rig.turns.release.set()
    assert rig.scheduler.wait_idle(5)


def test_a_refused_turn_is_skipped_with_its_reason(tmp_path: Path) -> None:
    rig = Rig(tmp_path, EVERY_MINUTE)
    rig.turns.refused["a1"] = "a1 is held by the kill switch: drill"
    rig.tick_at(0)
    rig.tick_at(60)
    rig.tick_at(120)
    assert rig.turns.calls == []
    row = rig.row()
    assert (row.last_run_at, row.last_outcome) == (None, None)  # no run yet
    assert (row.last_skip_at, row.last_skip_reason) == (
        (T0 + timedelta(minutes=2)).timestamp(),
        "a1 is held by the kill switch: drill",
    )
    assert row.skips == 2 and row.runs == 0
    assert [e["reason"] for e in rig.events("schedule.skipped")] == [row.last_skip_reason] * 2
    assert rig.events("schedule.run") == []
    # Each refusal went through the turn service (its transcript line), as a schedule turn.
    assert [(r["trigger"], r["who"].name, r["refused"]) for r in rig.turns.refusals] == [
        ("schedule", "scheduler", "a1 is held by the kill switch: drill")
    ] * 2
    del rig.turns.refused["a1"]  # released: the next one runs
    rig.tick_at(180)
    assert rig.scheduler.wait_idle(5) and len(rig.turns.calls) == 1


def test_outside_active_hours_is_skipped(tmp_path: Path) -> None:
    window = {"start": "09:00", "end": "10:02"}
    rig = Rig(tmp_path, [{**EVERY_MINUTE[0], "active_hours": window, "tz": "Europe/Paris"}])
    rig.tick_at(0)
    rig.tick_at(60)  # 11:01 in Paris: outside
    assert rig.turns.calls == [] and rig.turns.refusals == []  # never asked: no turn at all
    assert rig.row().last_skip_reason == "outside active hours (09:00-10:02 Europe/Paris)"
    rig.set_schedule([{**EVERY_MINUTE[0], "active_hours": window}])  # UTC: 10:02 is the end
    rig.tick_at(61)  # a changed entry is a new one: planned from now
    rig.tick_at(121)  # 10:02:01 UTC: the end is excluded
    assert (
        rig.turns.calls == []
        and rig.row().last_skip_at == (T0 + timedelta(seconds=121)).timestamp()
    )
    rig.set_schedule([{**EVERY_MINUTE[0], "active_hours": {"start": "09:00", "end": "18:00"}}])
    rig.tick_at(122)
    rig.tick_at(182)
    assert rig.scheduler.wait_idle(5) and len(rig.turns.calls) == 1


def test_missed_runs_are_not_replayed_after_a_restart(tmp_path: Path) -> None:
    rig = Rig(tmp_path, EVERY_MINUTE)
    rig.turns.block = True
    rig.tick_at(0)
    rig.tick_at(60)  # a run under way when the control plane goes away
    assert rig.turns.started.wait(5)
    assert rig.row().last_outcome == "running"
    # Ten minutes later a new control plane (same store): the run left `running` died with
    # the old one; none of the ten missed runs happens, the next is a minute from now.
    old, old_turns, rig.turns = rig.scheduler, rig.turns, FakeTurns()
    old.stop()
    rig.clock.at(660)
    rig.scheduler = rig.new_scheduler()
    row = rig.row()
    assert (row.last_outcome, row.last_reason) == (
        "interrupted",
        "the control plane stopped during the run",
    )
    rig.tick_at(660)
    rig.tick_at(719)
    assert rig.turns.calls == []
    assert rig.row().next_run_at == (T0 + timedelta(seconds=720)).timestamp()
    rig.tick_at(720)
    assert rig.scheduler.wait_idle(5)
    assert len(rig.turns.calls) == 1 and rig.row().last_outcome == "ok"
    old_turns.release.set()  # (the old process's thread: in life it died with it)
    assert old.wait_idle(5) and rig.row().last_outcome == "ok"


def test_a_changed_schedule_does_not_inherit_the_old_rows(tmp_path: Path) -> None:
    rig = Rig(tmp_path, EVERY_MINUTE)
    rig.tick_at(0)
    rig.tick_at(60)
    assert rig.scheduler.wait_idle(5) and rig.row().runs == 1
    rig.set_schedule([{"every": "5m", "prompt": "check the inbox"}])  # an upgrade changed it
    rig.tick_at(61)
    [row] = rig.store.states()
    assert (row.runs, row.last_run_at, row.last_outcome) == (0, None, None)
    assert row.next_run_at == (T0 + timedelta(seconds=61 + 300)).timestamp()
    rig.entries = []  # the agent removed
    rig.tick_at(62)
    assert rig.store.states() == []


def test_a_failed_turn_is_recorded_and_a_stopped_scheduler_starts_nothing(tmp_path: Path) -> None:
    rig = Rig(tmp_path, EVERY_MINUTE)
    rig.turns.fail = "the runtime went away"
    rig.tick_at(0)
    rig.tick_at(60)
    assert rig.scheduler.wait_idle(5)
    row = rig.row()
    assert (row.last_outcome, row.last_reason) == ("failed", "the runtime went away")
    rig.turns.done = {"type": "done", "ok": False, "error": "exit code 3"}
    rig.turns.fail = None
    rig.tick_at(120)
    assert rig.scheduler.wait_idle(5)
    assert (rig.row().last_outcome, rig.row().last_reason) == ("failed", "exit code 3")
    rig.scheduler.stop()
    rig.tick_at(180)
    assert len(rig.turns.calls) == 2


def test_entries_of_several_agents_run_in_parallel_and_are_capped(tmp_path: Path) -> None:
    agents = 3
    rig = Rig(tmp_path, [])
    rig.entries = [
        Entry(f"a{n}", 0, ScheduleEntry(every="1m", prompt="p", session="s")) for n in range(agents)
    ]
    rig.scheduler.max_running = 2
    rig.turns.block = True
    rig.tick_at(0)
    rig.tick_at(60)
    rows = {s.agent: s for s in rig.store.states()}
    assert [rows[f"a{n}"].last_outcome for n in range(agents)] == ["running", "running", None]
    assert rows["a2"].last_skip_reason == "2 scheduled turns are running already"
    rig.turns.release.set()
    assert rig.scheduler.wait_idle(5)
