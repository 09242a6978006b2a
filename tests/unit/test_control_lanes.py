"""The data plane never starves the control plane: agent turns and sandbox execs run on lanes of
their own (appliance/control/api/lanes.py), so with every slot taken by a command that does not
end, `POST /kill`, `/release` and `/status` still answer at once, and one more exec or turn is
refused with 429 in the one error shape (not queued behind the others).

The app is the real one (create_app over a real ControlPlane); only what would reach Podman is
replaced: an exec or turn that blocks until the test lets it go, and a status gather."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from appliance.config import load_config
from appliance.control.api import create_app, lanes
from appliance.control.api.deps import Principal, principal
from appliance.control.plane import ControlPlane

DEFAULT_POOL = 40  # anyio's default thread limiter: what sync routes used to share
ANSWER_WITHIN_S = 3.0


@pytest.fixture
def plane(tmp_path: Path) -> Iterator[ControlPlane]:
    p = ControlPlane(load_config({"state_dir": str(tmp_path / "state")}))
    yield p
    p.close()


def _app(plane: ControlPlane, release: threading.Event) -> Any:
    def blocked(*_args: object) -> dict[str, Any]:
        release.wait(30)  # a `sleep` in a sandbox, or an agent's hour-long turn
        return {"exit_code": 0, "stdout": "", "stderr": "", "truncated": False}

    def turn(*_args: object) -> Iterator[dict[str, Any]]:
        yield {"type": "done", **blocked()}

    plane.sandboxes.exec = blocked  # type: ignore[method-assign]
    plane.turns.start = turn  # type: ignore[method-assign]
    plane.status = lambda: {"control": "ok"}  # type: ignore[method-assign]
    app = create_app(plane)
    app.dependency_overrides[principal] = lambda: Principal("unix", "uid:0", "admin", uid=0)
    return app


async def _flood(plane: ControlPlane, path: str, body: dict[str, Any]) -> None:
    release = threading.Event()
    app = _app(plane, release)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1/api/v1") as api:
        flood = [
            asyncio.create_task(api.post(path, json=body, timeout=60))
            for _ in range(DEFAULT_POOL + 8)
        ]
        await asyncio.sleep(0.5)  # every call has started or been refused by now
        try:
            async with asyncio.timeout(ANSWER_WITHIN_S):
                kill = await api.post("/kill", json={"names": ["no-such-box"]})
                release_ = await api.post("/release")
                status = await api.get("/status")
        finally:
            release.set()
        answers = await asyncio.gather(*flood)
    assert kill.status_code == 404 and kill.json()["error"]["type"] == "not_found", kill.text
    assert release_.status_code == 200 and release_.json() == {"hold": False}
    assert status.status_code == 200 and status.json() == {"control": "ok"}
    codes = sorted(a.status_code for a in answers)
    slots = lanes.EXECS.slots if "exec" in path else lanes.TURNS.slots
    assert codes.count(200) == slots and codes.count(429) == len(answers) - slots, codes
    busy = next(a for a in answers if a.status_code == 429).json()["error"]
    assert busy["type"] == "busy" and "running already" in busy["message"] and busy["hint"]


def test_execs_that_never_end_leave_kill_release_and_status_answering(
    plane: ControlPlane,
) -> None:
    asyncio.run(_flood(plane, "/sandboxes/box/exec", {"argv": ["sleep", "600"]}))


def test_turns_that_never_end_leave_kill_release_and_status_answering(
    plane: ControlPlane,
) -> None:
    asyncio.run(_flood(plane, "/agents/agent/turns", {"message": "think for an hour"}))


def test_a_lane_that_queues_never_refuses() -> None:
    lane = lanes.Lane("calls", 1, refuse_when_full=False)
    gate = threading.Event()

    async def main() -> list[str]:
        first = asyncio.create_task(lane.run(lambda: gate.wait(5) and "first"))
        await asyncio.sleep(0.1)
        second = asyncio.create_task(lane.run(lambda: "second"))
        await asyncio.sleep(0.1)
        assert not second.done()  # waits for the one slot, is not refused
        gate.set()
        return [await first, await second]

    assert asyncio.run(main()) == ["first", "second"]
