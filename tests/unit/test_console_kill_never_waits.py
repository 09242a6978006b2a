"""Open console tabs never make the kill switch wait: every tab polls the pending approvals each
second, and a hung proxy holds a listing up to ADMIN_TIMEOUT_S. The tabs share one listing
(single flight) on the console's own lane, so POST /api/v1/kill and the console's kill form,
on the control lane, answer while the listing still hangs."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from appliance.console.sessions import COOKIE
from tests.console_fixtures import (
    BASE,
    Console,
    FakeApprovals,
    FakeKillSwitch,
    csrf_of,
    opened_console,
)

TABS = 30
HUNG_S = 5.0  # appliance.control.approvals.ADMIN_TIMEOUT_S


class HungApprovals(FakeApprovals):
    """A proxy that answers its listing only when released (or after HUNG_S)."""

    def __init__(self) -> None:
        super().__init__([])
        self.released = threading.Event()
        self.listings = 0

    def list(self) -> list[dict[str, Any]]:
        self.listings += 1
        self.released.wait(HUNG_S)
        return super().list()


@pytest.fixture
def console(tmp_path: Path) -> Iterator[Console]:
    yield from opened_console(tmp_path)


def test_polling_tabs_on_a_hung_proxy_never_delay_a_kill(console: Console) -> None:
    hung = HungApprovals()
    kill_switch = FakeKillSwitch()
    console.plane.__dict__["approvals"] = hung
    console.plane.__dict__["kill_switch"] = kill_switch
    browser = console.logged_in("ops-1")
    csrf = csrf_of(browser.get("/kill").text)
    cookies = {COOKIE: browser.cookies[COOKIE]}
    token = console.operator("ops-api", "operator")

    async def run() -> tuple[float, float, list[int]]:
        transport = httpx.ASGITransport(app=console.app)
        async with httpx.AsyncClient(transport=transport, base_url=BASE, cookies=cookies) as tab:

            async def poll() -> int:
                poll_header = {"x-console-poll": "1"}
                answer = await tab.get("/fragments/approvals/pending", headers=poll_header)
                return answer.status_code

            tabs = [asyncio.ensure_future(poll()) for _ in range(TABS)]
            await asyncio.sleep(0.3)  # every tab is waiting on the hung listing now
            started = time.monotonic()
            api = await tab.post(
                "/api/v1/kill",
                json={"all": True},
                headers={"authorization": f"Bearer {token}"},
            )
            api_s = time.monotonic() - started
            assert api.status_code == 200, api.text
            started = time.monotonic()
            form = {"csrf": csrf, "action": "all", "confirmed": "yes"}
            page = await tab.post("/kill", data=form, headers={"origin": BASE})
            form_s = time.monotonic() - started
            assert page.status_code == 303, page.text
            assert not hung.released.is_set() and not any(t.done() for t in tabs)
            hung.released.set()
            return api_s, form_s, list(await asyncio.gather(*tabs))

    try:
        api_s, form_s, polled = asyncio.run(run())
    finally:
        hung.released.set()
    assert api_s < 2.0 and form_s < 2.0, (api_s, form_s)
    assert [c[0] for c in kill_switch.calls] == ["kill", "kill"]
    assert polled == [200] * TABS
    assert hung.listings == 1  # thirty tabs, one listing
