"""The console's Agents pages over a real control plane (tests/turn_fixtures.py: a real store and
agent, a runtime speaking over a real socket; only the Podman side is stood in for): the list
with state, blueprint, schedule and budget gauges; an agent's page; a turn run from the page as
the operator (audited with their name, the reply in the transcript, escaped); stop and start
through the agent service as the console operator; what a viewer sees and may not do; an
unknown or hostile name is a 404 page."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from appliance.control.api import lanes
from appliance.control.api.deps import Principal
from sandbox.lifecycle.errors import PodmanUnavailable
from tests.console_page_fixtures import browser, log_in, operator_token
from tests.turn_fixtures import AGENT, World, reply_events, turn_world

XSS = "<script>alert('x')</script>"


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
    with turn_world(tmp_path, monkeypatch) as made:
        yield made


@pytest.fixture
def operator(world: World) -> Iterator[tuple[TestClient, str]]:
    with browser(world.plane) as client:
        csrf = log_in(client, operator_token(world.plane, "olivia", "operator"))
        yield client, csrf


@pytest.fixture
def viewer(world: World) -> Iterator[tuple[TestClient, str]]:
    with browser(world.plane) as client:
        csrf = log_in(client, operator_token(world.plane, "victor", "viewer"))
        yield client, csrf


def _wait_for(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_anonymous_visits_go_to_the_login_page(world: World) -> None:
    with browser(world.plane) as client:
        for path in ("/agents", f"/agents/{AGENT}", "/fragments/agents"):
            answer = client.get(path)
            assert answer.status_code == 303 and answer.headers["location"].startswith("/login")
        assert client.post(f"/agents/{AGENT}/stop", data={"csrf": "x"}).status_code == 401


def test_the_list_shows_state_blueprint_budget_and_last_turns(
    world: World, viewer: tuple[TestClient, str]
) -> None:
    client, _ = viewer
    world.plane.turns.transcripts.append(
        AGENT, {"ts": time.time() - 30, "ok": True, "message": "m", "tokens": {"total": 321}}
    )
    page = client.get("/agents")
    assert page.status_code == 200, page.text
    html = page.text
    assert f'href="/agents/{AGENT}"' in html and "served@1.0.0" in html
    assert 'class="state state-running"' in html
    assert '<meter min="0" max="1000.0"' in html and "tokens today" in html  # its daily budget
    assert "today 0 tokens · this month 0 tokens" in html
    assert "321 tokens" in html and "outcome-ok" in html
    assert 'data-refresh="/fragments/agents"' in html
    fragment = client.get("/fragments/agents")
    assert fragment.status_code == 200 and "<html" not in fragment.text
    assert "served@1.0.0" in fragment.text


def test_a_viewer_sees_no_actions_and_is_refused_them(
    world: World, viewer: tuple[TestClient, str]
) -> None:
    client, csrf = viewer
    world.plane.turns.transcripts.append(
        AGENT, {"ts": time.time(), "ok": True, "message": "secret plan", "reply": "noted"}
    )
    page = client.get(f"/agents/{AGENT}")
    assert page.status_code == 200, page.text
    assert "Run the turn" not in page.text and 'id="agent-stop"' not in page.text
    assert 'id="agent-kill"' not in page.text
    assert "secret plan" not in page.text  # the transcript's text is an operator's to read
    assert "Messages and replies are shown to operators" in page.text
    for action in ("stop", "start"):
        refused = client.post(f"/agents/{AGENT}/{action}", data={"csrf": csrf})
        assert refused.status_code == 403
    refused = client.post(f"/agents/{AGENT}/turn", data={"csrf": csrf, "message": "hi"})
    assert refused.status_code == 403
    assert world.script.requests == []  # no turn reached the runtime


def test_an_operator_runs_a_turn_from_the_page(
    world: World, operator: tuple[TestClient, str]
) -> None:
    client, csrf = operator
    world.script.events = reply_events("<b>bold</b> ", XSS)
    world.script.usage = (120, 30, 0.2)
    page = client.get(f"/agents/{AGENT}")
    assert "Run the turn" in page.text and 'id="agent-stop"' in page.text
    answer = client.post(f"/agents/{AGENT}/turn", data={"csrf": csrf, "message": XSS})
    assert answer.status_code == 303 and answer.headers["location"] == f"/agents/{AGENT}"
    _wait_for(lambda: len(world.audit("agent.turn")) == 1)  # written after the transcript line
    [line] = world.transcript()
    assert line["ok"] and line["message"] == XSS and line["actor"] == "olivia"
    assert line["actor_kind"] == "console"
    [turn] = world.audit("agent.turn")
    assert (turn["actor"], turn["actor_kind"]) == ("olivia", "console")
    posts = [r for r in world.audit("control.request") if r["path"] == f"/agents/{AGENT}/turn"]
    assert [(r["actor"], r["method"], r["status"]) for r in posts] == [("olivia", "POST", 303)]
    page = client.get(f"/agents/{AGENT}")
    assert "The turn is running" not in page.text  # it ended: its reply is shown instead
    assert XSS not in page.text and "&lt;script&gt;" in page.text
    assert "&lt;b&gt;bold&lt;/b&gt;" in page.text and "150 tokens" in page.text
    # The Spend page shows what the turn used.
    spend = client.get("/spend")
    assert 'id="spend-total-tokens">150<' in spend.text


def test_a_refused_turn_is_said_on_the_page(world: World, operator: tuple[TestClient, str]) -> None:
    client, csrf = operator
    world.runtime["state"] = "fail_closed"
    answer = client.post(f"/agents/{AGENT}/turn", data={"csrf": csrf, "message": "hi"})
    assert answer.status_code == 303
    page = client.get(f"/agents/{AGENT}")
    assert "The turn was not started" in page.text
    empty = client.post(f"/agents/{AGENT}/turn", data={"csrf": csrf, "message": "  "})
    assert (
        empty.status_code == 303 and "Write a message" in client.get(empty.headers["location"]).text
    )
    assert world.script.requests == []


def test_a_form_without_its_csrf_token_is_refused(
    world: World, operator: tuple[TestClient, str]
) -> None:
    client, _ = operator
    assert client.post(f"/agents/{AGENT}/turn", data={"message": "hi"}).status_code == 403
    assert client.post(f"/agents/{AGENT}/stop", data={"csrf": "wrong"}).status_code == 403
    assert world.script.requests == []


def test_stop_and_start_go_through_the_agent_service_as_the_operator(
    world: World, operator: tuple[TestClient, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    client, csrf = operator
    calls: list[tuple[str, Principal, str]] = []

    def recorder(action: str, state: str) -> Any:
        def change(who: Principal, name: str) -> dict[str, Any]:
            calls.append((action, who, name))
            return {"name": name, "state": state}

        return change

    monkeypatch.setattr(world.plane.agents, "stop", recorder("stop", "stopped"))
    monkeypatch.setattr(world.plane.agents, "start", recorder("start", "running"))
    stopped = client.post(f"/agents/{AGENT}/stop", data={"csrf": csrf})
    assert stopped.status_code == 303
    assert f"{AGENT} is stopped." in client.get(stopped.headers["location"]).text
    client.post(f"/agents/{AGENT}/start", data={"csrf": csrf})
    assert [(a, w.kind, w.name, w.role, n) for a, w, n in calls] == [
        ("stop", "console", "olivia", "operator", AGENT),
        ("start", "console", "olivia", "operator", AGENT),
    ]
    # The kill button leads to the kill switch's confirmation page for this agent's sandbox.
    page = client.get(f"/agents/{AGENT}").text
    assert 'action="/kill/confirm"' in page and f'name="name" value="{AGENT}"' in page


@pytest.mark.parametrize(
    "name", ["nobody", "%3Cscript%3Ealert(1)%3C%2Fscript%3E", "a" * 5000, "..%2F..%2Fetc"]
)
def test_an_unknown_or_hostile_agent_is_a_404_page(
    world: World, operator: tuple[TestClient, str], name: str
) -> None:
    client, csrf = operator
    for path in (f"/agents/{name}", f"/fragments/agents/{name}"):
        answer = client.get(path)
        assert answer.status_code == 404, (path, answer.text[:500])
        assert "<script>alert" not in answer.text
    refused = client.post(f"/agents/{name}/turn", data={"csrf": csrf, "message": "hi"})
    assert refused.status_code == 404 and "<script>alert" not in refused.text


def test_turns_posted_at_once_all_run_and_a_full_lane_is_said(
    world: World, operator: tuple[TestClient, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    client, csrf = operator
    world.script.events = reply_events("done")
    world.script.pause_s = 0.2  # each turn still runs while the others are posted

    def post(i: int) -> int:
        data = {"csrf": csrf, "message": f"turn {i}"}
        return client.post(f"/agents/{AGENT}/turn", data=data).status_code

    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(post, range(4))) == [303] * 4
    _wait_for(lambda: len(world.transcript()) == 4)
    lines = world.transcript()
    assert sorted(line["message"] for line in lines) == [f"turn {i}" for i in range(4)]
    assert all(line["ok"] and line["actor"] == "olivia" for line in lines)
    # Every turn slot taken: refused at once with the reason, nothing reaches the runtime.
    monkeypatch.setattr(lanes.TURNS, "slots", 0)
    before = len(world.script.requests)
    client.post(f"/agents/{AGENT}/turn", data={"csrf": csrf, "message": "one more"})
    page = client.get(f"/agents/{AGENT}").text
    assert "The turn was not started: 0 agent turns are running already" in page
    assert len(world.script.requests) == before


def test_a_host_that_cannot_run_sandboxes_is_said_on_the_page(
    world: World, viewer: tuple[TestClient, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    client, _ = viewer

    def not_ready(ready: bool = True) -> Any:
        raise PodmanUnavailable("sandboxes are managed by root (the control plane)", hint="sudo")

    monkeypatch.setattr(world.plane.sandboxes, "manager", not_ready)
    page = client.get("/agents")
    assert page.status_code == 200
    assert "The agents could not be read: sandboxes are managed by root" in page.text
    detail = client.get(f"/agents/{AGENT}")
    assert detail.status_code == 503 and "sandboxes are managed by root" in detail.text


def test_the_turn_is_said_to_run_only_while_it_runs(
    world: World, operator: tuple[TestClient, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    client, _ = operator
    running = {AGENT: 1}
    monkeypatch.setattr(world.plane.turns, "running", lambda name: running.get(name, 0))
    for path in (f"/agents/{AGENT}", f"/fragments/agents/{AGENT}"):  # the page and its refresh
        assert 'id="turn-running"' in client.get(path).text, path
    running[AGENT] = 0  # the reply arrived: the next refresh drops the message
    for path in (f"/agents/{AGENT}", f"/fragments/agents/{AGENT}"):
        assert "The turn is running" not in client.get(path).text, path
