"""A turn cut by the kill switch, `agent stop` or `agent rm` ends at once, cancelled, saying why,
even while its runtime is not ready (a real adapter waits up to 120 s for it). No Podman:
tests/turn_fixtures.py's world, with the sandbox manager's kill/stop/remove as the store's."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.control import turns as turns_module
from blueprints.model import Blueprint
from blueprints.runtimes.command import CommandRuntime
from tests.turn_fixtures import AGENT, Sandboxes, World, turn_world


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
    served = Blueprint.model_validate(
        {
            "name": "served",
            "version": "1.0.0",
            "runtime": {"kind": "command", "command": ["x"], "serve": {"port": 8080}},
            "image": {"name": "localhost/appliance-base", "digest": "sha256:" + "ab" * 32},
            "sandbox": {"base": "default"},
        }
    )

    def kill(self: Sandboxes, names: list[str], hold: bool, reason: str) -> list[str]:
        for name in names:
            self.boxes.set_state(name, "stopped")
        return names

    monkeypatch.setattr(Sandboxes, "kill", kill, raising=False)
    monkeypatch.setattr(Sandboxes, "store_audit", lambda *_a, **_k: None, raising=False)
    with turn_world(tmp_path, monkeypatch) as made:  # (it sets runtime_for: set it after)
        monkeypatch.setattr(turns_module, "runtime_for", lambda _bp: CommandRuntime(served))
        made.script.ready_status = 503  # the runtime is not ready: the turn waits for it
        yield made


def _cut_while_waiting(world: World, cut: Callable[[], Any]) -> tuple[dict[str, Any], float]:
    """Start a turn, cut it once it waits for its runtime; its done record and how long after."""
    done: list[dict[str, Any]] = []

    def run() -> None:
        events = world.plane.turns.start(None, AGENT, "hi", "s-1", trigger="schedule")
        done.extend(e for e in events if e["type"] == "done")

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 5
    while world.script.ready_checks < 2:
        assert time.monotonic() < deadline, "the runtime was never asked if it is ready"
        time.sleep(0.02)
    cut_at = time.monotonic()
    cut()
    thread.join(10)
    assert not thread.is_alive(), "the turn kept waiting for its runtime"
    return done[0], time.monotonic() - cut_at


def test_the_kill_switch_ends_the_turns_of_what_it_stopped_at_once(world: World) -> None:
    body = {"names": [AGENT], "reason": "drill"}
    record, took = _cut_while_waiting(world, lambda: world.api.post("/kill", json=body))
    assert took < 2.0
    assert record["cancelled"] is True and record["ok"] is False
    assert record["error"] == "cancelled: the kill switch stopped it (drill)"
    [line] = world.transcript()
    assert line["cancelled"] is True and "kill switch" in line["error"]
    assert world.script.requests == []  # never reached the runtime


@pytest.mark.parametrize(("how", "why"), [("stop", "stopped"), ("remove", "removed")])
def test_agent_stop_and_rm_end_its_turns_at_once(
    world: World, monkeypatch: pytest.MonkeyPatch, how: str, why: str
) -> None:
    agents = world.plane.agents
    monkeypatch.setattr(agents, "_guarded", lambda who, name: _Managed())
    monkeypatch.setattr(agents, "get", lambda name: {"name": name})
    record, took = _cut_while_waiting(world, lambda: getattr(agents, how)(None, AGENT))
    assert took < 2.0
    assert record["cancelled"] is True and record["error"] == f"cancelled: the agent was {why}"


def test_interrupt_leaves_other_agents_turns_alone(world: World) -> None:
    assert world.plane.turns.interrupt(["someone-else"], "not this one") == 0


class _Managed:
    """AgentService's guarded manager, whose stop and remove do nothing here."""

    def __enter__(self) -> _Managed:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def stop(self, name: str) -> None:
        pass

    def remove(self, name: str) -> None:
        pass
