"""The console as `serve control` serves it: the real server (server.server()) on a real loopback
port over a real ControlPlane, a real HTTP client keeping cookies as a browser does.

Logging in and acting goes through real HTTP (cookie, CSRF, redirect); the console's pages never
block the event loop: while a slow status report is gathered (the GPUs, the backend's /metrics,
each proxy), the login page, the kill switch's confirmation and the API still answer at once; and
twenty tabs polling the Overview at once cost one gathering."""

from __future__ import annotations

import asyncio
import re
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from appliance.config import load_config
from appliance.console.sessions import COOKIE
from appliance.control.plane import ControlPlane
from appliance.control.server import bind_tcp
from tests.console_fixtures import SETUP, FakeKillSwitch, report
from tests.control_fixtures import serving

SLOW_STATUS_S = 1.5


class _Served:
    def __init__(self, plane: ControlPlane, port: int) -> None:
        self.plane, self.port = plane, port
        self.gathered = 0
        self.gathering = threading.Event()
        self.hold_s = SLOW_STATUS_S  # how long a gathering takes unless released earlier
        self.release = threading.Event()
        self.gathered_all = threading.Event()

    def slow_status(self) -> dict[str, Any]:
        self.gathered += 1
        self.gathering.set()
        self.release.wait(self.hold_s)
        self.gathered_all.set()
        return report()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture
def served() -> Iterator[_Served]:
    scratch = Path(tempfile.mkdtemp(prefix="console-", dir="/tmp"))
    plane = ControlPlane(load_config({"state_dir": str(scratch / "state")}))
    listener = bind_tcp("127.0.0.1", 0)
    this = _Served(plane, listener.getsockname()[1])
    plane.status = this.slow_status  # type: ignore[method-assign]
    plane.__dict__["kill_switch"] = FakeKillSwitch()
    try:
        with serving(plane, [listener]):
            yield this
    finally:
        plane.close()
        shutil.rmtree(scratch, ignore_errors=True)


def _csrf(page: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', page)
    assert found, page[:500]
    return found.group(1)


async def _logged_in(served: _Served, client: httpx.AsyncClient) -> None:
    _, token = served.plane.operators.create("ops-1", "operator", SETUP.audit_fields())
    form = await client.get("/login")  # its CSRF token: in the form's field and a cookie
    answer = await client.post("/login", data={"token": token, "csrf": _csrf(form.text)})
    assert answer.status_code == 303 and COOKIE in client.cookies


async def _while_status_gathers(served: _Served) -> list[str]:
    """What answered while the gathering was held (it is held until they all have: no clock)."""
    served.hold_s = 60
    answered: list[str] = []
    async with httpx.AsyncClient(base_url=served.base, timeout=30) as client:
        await _logged_in(served, client)
        overview = asyncio.create_task(client.get("/"))
        while not served.gathering.is_set():
            await asyncio.sleep(0.01)
        try:
            async with httpx.AsyncClient(base_url=served.base, timeout=30) as other:
                for name, call in [
                    ("login page", lambda: other.get("/login")),
                    ("kill confirm", lambda: client.get("/kill/confirm?action=all&hold=1")),
                    ("api openapi", lambda: other.get("/api/v1/openapi.json")),
                ]:
                    answer = await call()
                    assert answer.status_code == 200, name
                    if not served.gathered_all.is_set():
                        answered.append(name)
        finally:
            served.release.set()
        assert (await overview).status_code == 200
    return answered


def test_pages_answer_while_the_status_report_is_gathered(served: _Served) -> None:
    answered = asyncio.run(_while_status_gathers(served))
    assert answered == ["login page", "kill confirm", "api openapi"]


async def _poll_from_tabs(served: _Served, tabs: int) -> list[int]:
    async with httpx.AsyncClient(base_url=served.base, timeout=30) as client:
        await _logged_in(served, client)
        answers = await asyncio.gather(*(client.get("/fragments/overview") for _ in range(tabs)))
    return [a.status_code for a in answers]


def test_twenty_tabs_polling_cost_one_gathering(served: _Served) -> None:
    assert asyncio.run(_poll_from_tabs(served, 20)) == [200] * 20
    assert served.gathered == 1


async def _kill_over_http(served: _Served) -> httpx.Response:
    async with httpx.AsyncClient(base_url=served.base, timeout=30) as client:
        await _logged_in(served, client)
        confirm = await client.get("/kill/confirm", params={"action": "all", "hold": "1"})
        form = {"csrf": _csrf(confirm.text), "confirmed": "yes", "action": "all", "hold": "1"}
        refused = await client.post("/kill", data={**form, "csrf": "forged"})
        assert refused.status_code == 403
        return await client.post("/kill", data=form)


def test_a_kill_over_real_http_is_done_as_the_operator(served: _Served) -> None:
    answer = asyncio.run(_kill_over_http(served))
    assert answer.status_code == 303 and answer.headers["location"] == "/kill"
    kill_switch = served.plane.__dict__["kill_switch"]
    [(verb, who, names, all_, hold, _reason)] = kill_switch.calls
    assert names == []
    assert (verb, who.name, who.kind, all_, hold) == ("kill", "ops-1", "console", True, True)
