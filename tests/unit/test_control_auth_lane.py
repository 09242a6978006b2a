"""The kill switch never waits behind the shared thread pool: with anyio's default pool (what every
sync route runs in) full of sandbox creates that do not end, `POST /kill`, `/release` and `/status`
still answer at once, both for a unix-socket peer and for an operator token on the port. Their
auth (api/deps.py) and their audit-trail record (api/audit_trail.py) take no thread from that pool.

A real server (server.server(), the one `serve control` runs) on a real unix socket and a loopback
port, over a real ControlPlane; only what would reach Podman is replaced: a create that blocks
until the test lets it go, and a status gather."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio.to_thread
import httpx
import pytest

from appliance.audit import audit_path, records
from appliance.config import load_config
from appliance.control.plane import ControlPlane
from appliance.control.server import bind_tcp, bind_unix
from tests.control_fixtures import serving

ANSWER_WITHIN_S = 3.0
POLICY = "network:\n  allow: []\n"


async def _default_pool_size() -> int:
    return int(anyio.to_thread.current_default_thread_limiter().total_tokens)


DEFAULT_POOL = asyncio.run(_default_pool_size())  # 40: what every sync route shares


@pytest.fixture
def scratch() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="auth-lane-", dir="/tmp"))  # a unix socket path is short
    yield path
    shutil.rmtree(path, ignore_errors=True)


class _Served:
    def __init__(self, plane: ControlPlane, sock: Path, port: int) -> None:
        self.plane, self.sock, self.port = plane, sock, port
        self.release = threading.Event()
        self.blocked = 0
        self._count = threading.Lock()

    def create(self, *_args: object) -> dict[str, Any]:
        with self._count:
            self.blocked += 1
        self.release.wait(60)  # a create pulling an image for minutes
        return {"name": "box"}


@pytest.fixture
def served(scratch: Path) -> Iterator[_Served]:
    plane = ControlPlane(load_config({"state_dir": str(scratch / "state")}))
    sock = scratch / "control.sock"
    listeners = [bind_unix(sock), bind_tcp("127.0.0.1", 0)]
    this = _Served(plane, sock, listeners[1].getsockname()[1])
    plane.sandboxes.create = this.create  # type: ignore[method-assign]
    plane.status = lambda: {"control": "ok"}  # type: ignore[method-assign]
    try:
        with serving(plane, listeners):
            try:
                yield this
            finally:
                this.release.set()  # blocked creates first, or the server's stop waits for them
    finally:
        plane.close()


async def _control_calls(api: httpx.AsyncClient) -> list[httpx.Response]:
    async with asyncio.timeout(ANSWER_WITHIN_S):
        return [
            await api.post("/kill", json={"names": ["no-such-box"]}),
            await api.post("/release"),
            await api.get("/status"),
        ]


async def _with_pool_full(served: _Served, token: str) -> dict[str, list[httpx.Response]]:
    peer = httpx.AsyncHTTPTransport(uds=str(served.sock))
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    base = "http://localhost/api/v1"
    async with (
        httpx.AsyncClient(transport=peer, base_url=base, limits=limits, timeout=90) as flooder,
        httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(uds=str(served.sock)), base_url=base
        ) as by_peer,
        httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{served.port}/api/v1",
            headers={"Authorization": f"Bearer {token}"},
        ) as by_token,
    ):
        body = {"name": "box", "policy": POLICY}
        flood = [
            asyncio.create_task(flooder.post("/sandboxes", json=body))
            for _ in range(DEFAULT_POOL + 4)
        ]
        deadline = time.monotonic() + 30
        while served.blocked < DEFAULT_POOL:  # every thread of the shared pool is taken
            assert time.monotonic() < deadline, f"only {served.blocked} creates started"
            await asyncio.sleep(0.05)
        try:
            answers = {
                "peer": await _control_calls(by_peer),
                "token": await _control_calls(by_token),
            }
            assert served.blocked == DEFAULT_POOL  # still full while they answered
        finally:
            served.release.set()
            created = await asyncio.gather(*flood, return_exceptions=True)
    assert {getattr(r, "status_code", r) for r in created} == {201}, created
    return answers


def test_kill_release_and_status_answer_with_the_shared_pool_full(served: _Served) -> None:
    who = {"actor": "uid:0", "actor_kind": "unix"}
    _, token = served.plane.operators.create("pager", "operator", who)
    answers = asyncio.run(_with_pool_full(served, token))
    for way, (kill, release, status) in answers.items():
        assert kill.status_code == 404 and kill.json()["error"]["type"] == "not_found", way
        assert release.status_code == 200 and release.json() == {"hold": False}, way
        assert status.status_code == 200 and status.json() == {"control": "ok"}, way
    # Each kill and release was recorded by the audit trail, with who: the peer, the operator.
    trail = [
        (r["actor"], r["path"], r["status"])
        for r in records(audit_path(served.plane.config.state_dir))
        if r.get("event") == "control.request" and r.get("path") != "/api/v1/sandboxes"
    ]
    peer = f"uid:{os.getuid()}"
    assert trail == [
        (peer, "/api/v1/kill", 404),
        (peer, "/api/v1/release", 200),
        ("pager", "/api/v1/kill", 404),
        ("pager", "/api/v1/release", 200),
    ]


def test_a_bad_token_is_refused_with_the_shared_pool_full(served: _Served) -> None:
    async def main() -> httpx.Response:
        async with httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(uds=str(served.sock)), timeout=90
        ) as flooder:
            body = {"name": "box", "policy": POLICY}
            flood = [
                asyncio.create_task(flooder.post("http://localhost/api/v1/sandboxes", json=body))
                for _ in range(DEFAULT_POOL)
            ]
            deadline = time.monotonic() + 30
            while served.blocked < DEFAULT_POOL:
                assert time.monotonic() < deadline, f"only {served.blocked} creates started"
                await asyncio.sleep(0.05)
            try:
                async with (
                    asyncio.timeout(ANSWER_WITHIN_S),
                    httpx.AsyncClient(base_url=f"http://127.0.0.1:{served.port}") as api,
                ):
                    return await api.post(
                        "/api/v1/kill",
                        json={"all": True},
                        headers={"Authorization": "Bearer sk-op-nobody"},
                    )
            finally:
                served.release.set()
                await asyncio.gather(*flood, return_exceptions=True)

    refused = asyncio.run(main())
    assert refused.status_code == 401 and refused.json()["error"]["type"], refused.text
