"""The 30-minute idle logout still happens with a tab open: the live refresh's background polls
(the /fragments/ the page's script re-fetches, or any request it marks X-Console-Poll) keep
the page current but are not the operator doing something, so they never restart the idle
clock; a page the operator opens does."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.console import sessions
from appliance.console.sessions import SessionStore
from tests.console_fixtures import Console, FakeApprovals, opened_console

POLLS = [
    ("/fragments/overview", {}),
    ("/fragments/approvals/pending", {}),
    ("/approvals", {"X-Console-Poll": "1"}),  # a page fetched by the script, marked
]


@pytest.fixture
def console(tmp_path: Path) -> Iterator[Console]:
    yield from opened_console(tmp_path)


@pytest.fixture
def now(console: Console) -> list[float]:
    clock = [1000.0]
    console.app.state.console.sessions = SessionStore(clock=lambda: clock[0])
    console.plane.__dict__["approvals"] = FakeApprovals([])
    return clock


def test_background_polls_do_not_keep_a_session_alive(console: Console, now: list[float]) -> None:
    tab = console.logged_in("ops-1")
    for _ in range(sessions.IDLE_S // 60 - 1):  # a poll of each kind every minute for 29 min
        now[0] += 60
        for path, headers in POLLS:
            assert tab.get(path, headers=headers).status_code == 200, path
    now[0] += 61  # 30 minutes and a second since the operator last did anything
    for path, headers in POLLS:
        gone = tab.get(path, headers=headers)
        assert gone.status_code == 303 and gone.headers["location"].startswith("/login")
    assert tab.get("/").status_code == 303


def test_what_the_operator_does_restarts_the_idle_clock(console: Console, now: list[float]) -> None:
    tab = console.logged_in("ops-1")
    for _ in range(6):  # a page opened every 20 minutes for 2 hours, polls in between
        now[0] += 20 * 60
        assert tab.get("/fragments/overview").status_code == 200
        assert tab.get("/approvals").status_code == 200
    now[0] += sessions.IDLE_S - 1
    assert tab.get("/").status_code == 200
