"""Budget admission under pressure (issue 11, item 2), with real processes: the gateway (as
`appliance serve gateway` runs it) in front of the stand-in vLLM streaming slowly.

- 64 concurrent requests against one key with a small daily budget: the spend never passes the
  cap, every answer admitted past 80 % of it (spend + reservations) carries the warning header,
  and every request has its ledger row.
- The gateway killed with SIGKILL during 8 streams: after a restart the 8 rows are there,
  settled `interrupted` and charged their reservation.
- A prompt that cannot fit the model's context is refused by the gateway (400
  `context_length_exceeded`) without reaching the backend (item 3).
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from appliance.store.inference_store import InferenceStore
from inference.ports import Budget
from tests.helpers import free_port
from tests.integration.gateway_harness import start_fake_vllm, start_gateway, stop

pytestmark = pytest.mark.integration

WARNING = "x-appliance-budget-warning"
REQUEST_ID = "x-appliance-request-id"
CAP = 5000  # daily tokens
MAX_TOKENS = 100


@dataclass
class Env:
    state: Path
    url: str
    backend_url: str
    store: InferenceStore
    settings: dict[str, Any]
    gateway: Any = None

    def headers(self, secret: str) -> dict[str, str]:
        return {"authorization": f"Bearer {secret}"}


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    backend_port, gateway_port = free_port(), free_port()
    # 10 ms a token: a 100-token answer streams for about a second, so a burst overlaps fully.
    backend = start_fake_vllm(
        backend_port, {"FAKE_VLLM_TOKEN_DELAY": "0.01"}, args=["--max-model-len", "4096"]
    )
    settings = {"backend_url": f"http://127.0.0.1:{backend_port}"}
    store = InferenceStore(tmp_path)
    e = Env(
        tmp_path,
        f"http://127.0.0.1:{gateway_port}",
        f"http://127.0.0.1:{backend_port}",
        store,
        settings,
    )
    e.gateway = start_gateway(tmp_path, gateway_port, settings)
    try:
        yield e
    finally:
        stop(e.gateway)
        stop(backend)
        store.close()


def body(i: int, stream: bool) -> dict[str, Any]:
    return {
        "model": "nemotron",
        "messages": [{"role": "user", "content": f"request number {i}"}],
        "max_tokens": MAX_TOKENS,
        "stream": stream,
    }


async def one(client: httpx.AsyncClient, url: str, secret: str, i: int) -> httpx.Response:
    stream = i % 2 == 0  # half streams, half whole answers
    headers = {"authorization": f"Bearer {secret}"}
    response = await client.post(url, json=body(i, stream), headers=headers)
    return response


async def burst(url: str, secret: str, n: int) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        return await asyncio.gather(
            *(one(client, f"{url}/v1/chat/completions", secret, i) for i in range(n))
        )


def wait_rows(store: InferenceStore, key_id: str, n: int, timeout: float = 10.0) -> list[dict]:
    """The key's ledger rows once `n` of them are settled (the writer batches)."""
    deadline = time.monotonic() + timeout
    while True:
        rows = store.ledger_entries(key_id)
        settled = [r for r in rows if r["state"] != "open"]
        if len(settled) >= n or time.monotonic() > deadline:
            return rows
        time.sleep(0.05)


def test_64_concurrent_requests_never_pass_the_daily_cap(env: Env) -> None:
    key, secret = env.store.create_key("burst", "client")
    env.store.set_budget(Budget(key.id, daily_tokens=CAP))
    responses = asyncio.run(burst(env.url, secret, 64))
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 429}, statuses
    assert statuses.count(200) >= 2  # the budget is meant to admit several of them
    for r in responses:
        if r.status_code == 429:
            error = r.json()["error"]
            assert error["code"] == "daily_tokens_budget_exceeded", error
            assert error["type"] == "insufficient_quota"

    deadline = time.monotonic() + 10
    while env.store.usage_totals(key.id)["requests"] < 64 and time.monotonic() < deadline:
        time.sleep(0.05)
    totals = env.store.usage_totals(key.id)
    spent = totals["prompt_tokens"] + totals["completion_tokens"]
    assert spent <= CAP, f"spent {spent} of a {CAP}-token daily budget"
    rows = wait_rows(env.store, key.id, 64)
    assert len(rows) == 64, [r["state"] for r in rows]  # every request has its ledger row
    assert all(r["state"] in ("ok", "refused") for r in rows), [r["state"] for r in rows]
    spent = sum(r["prompt_tokens"] + r["completion_tokens"] for r in rows)
    assert spent <= CAP, f"spent {spent} of a {CAP}-token daily budget"
    assert env.store.spend(key.id).day_tokens == spent

    # Past 80 %: every admitted answer whose admission brought spend + reservations to 80 % of
    # the cap carries the warning (none of the burst had settled when the last was admitted).
    by_id = {r["request_id"]: r for r in rows}
    admitted = sorted(
        ((by_id[r.headers[REQUEST_ID]], r) for r in responses if r.status_code == 200),
        key=lambda pair: pair[0]["id"],
    )
    assert len(admitted) == statuses.count(200)
    committed = 0
    warned = 0
    for row, response in admitted:
        committed += row["reserved_tokens"]
        assert row["prompt_tokens"] + row["completion_tokens"] <= row["reserved_tokens"]
        if committed >= 0.8 * CAP:
            assert response.headers.get(WARNING, "").startswith("daily tokens "), row
            warned += 1
        else:
            assert WARNING not in response.headers, (committed, row)
    assert warned >= 1  # the last one admitted is past 80 %: reservations are small here
    assert committed <= CAP


def test_the_cap_holds_after_settling_too(env: Env) -> None:
    """Sequential requests after a burst: admitted until the reservations no longer fit, each
    past 80 % warned; the ledger's total stays under the cap."""
    key, secret = env.store.create_key("steady", "client")
    env.store.set_budget(Budget(key.id, daily_tokens=1500))
    with httpx.Client(base_url=env.url, timeout=30) as client:
        statuses = []
        for i in range(40):
            r = client.post(
                "/v1/chat/completions", json=body(i, False), headers=env.headers(secret)
            )
            statuses.append(r.status_code)
            if r.status_code == 200:
                spent = env.store.spend(key.id).day_tokens  # settled so far (maybe not this one)
                assert spent <= 1500
    rows = wait_rows(env.store, key.id, 40)
    assert len(rows) == 40
    assert sum(r["prompt_tokens"] + r["completion_tokens"] for r in rows) <= 1500
    assert 200 in statuses and 429 in statuses


def test_max_tokens_is_capped_by_the_remaining_budget(env: Env) -> None:
    key, secret = env.store.create_key("capped", "client")
    env.store.set_budget(Budget(key.id, daily_tokens=1000))
    with httpx.Client(base_url=env.url, timeout=30) as client:
        r = client.post(
            "/v1/chat/completions",
            json={**body(0, False), "max_tokens": 3000},
            headers=env.headers(secret),
        )
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert usage["prompt_tokens"] + usage["completion_tokens"] <= 1000
    assert usage["completion_tokens"] < 1000  # the backend was asked for less than 3000


def test_a_cut_stream_releases_its_reservation(env: Env) -> None:
    key, secret = env.store.create_key("quitter", "client")
    env.store.set_budget(Budget(key.id, daily_tokens=100_000))
    with (
        httpx.Client(base_url=env.url, timeout=30) as client,
        client.stream(
            "POST",
            "/v1/chat/completions",
            json={**body(0, True), "max_tokens": 2000},
            headers=env.headers(secret),
        ) as r,
    ):
        for line in r.iter_lines():
            if line.startswith("data: ") and "tok3" in line:
                break  # hang up mid-stream
    rows = wait_rows(env.store, key.id, 1)
    assert [r["state"] for r in rows] == ["cancelled"]
    assert rows[0]["completion_tokens"] < 2000  # the partial answer, not the reservation
    # Nothing stays reserved: the next request may use the whole rest of the budget.
    assert env.store.reserved(key.id).day_tokens == 0


def test_a_backend_error_releases_its_reservation(env: Env) -> None:
    key, secret = env.store.create_key("errs", "client")
    env.store.set_budget(Budget(key.id, daily_tokens=100_000))
    with httpx.Client(base_url=env.url, timeout=30) as client:
        # 3,000 prompt tokens for the stand-in + 2,000: past its 4,096-token context, which only
        # the backend can tell (the gateway's lower bound is 6,000 characters / 256 = 24).
        messages = [{"role": "user", "content": "x " * 3000}]
        too_long = {**body(0, False), "messages": messages, "max_tokens": 2000}
        r = client.post("/v1/chat/completions", json=too_long, headers=env.headers(secret))
    assert r.status_code == 400
    rows = wait_rows(env.store, key.id, 1)
    assert [(r["state"], r["prompt_tokens"] + r["completion_tokens"]) for r in rows] == [
        ("error", 0)
    ]
    assert env.store.reserved(key.id).day_tokens == 0


def test_sigkill_during_8_streams_leaves_8_interrupted_rows(env: Env) -> None:
    key, secret = env.store.create_key("killed", "client")
    env.store.set_budget(Budget(key.id, daily_tokens=1_000_000))
    started = threading.Barrier(9)
    errors: list[BaseException] = []

    def stream(i: int) -> None:
        try:
            with (
                httpx.Client(base_url=env.url, timeout=30) as client,
                client.stream(
                    "POST",
                    "/v1/chat/completions",
                    json={**body(i, True), "max_tokens": 3000},
                    headers=env.headers(secret),
                ) as r,
            ):
                lines = r.iter_lines()
                for line in lines:
                    if line.startswith("data: "):
                        break
                started.wait(20)
                for _ in lines:  # until the gateway dies under us
                    pass
        except (httpx.HTTPError, threading.BrokenBarrierError):
            pass
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=stream, args=(i,), daemon=True) for i in range(8)]
    for t in threads:
        t.start()
    started.wait(20)  # all 8 have their first event: they are mid-stream
    env.gateway.send_signal(signal.SIGKILL)
    env.gateway.wait(10)
    for t in threads:
        t.join(20)
    assert not errors, errors

    env.gateway = start_gateway(env.state, int(env.url.rsplit(":", 1)[1]), env.settings)
    assert env.store.usage_totals(key.id)["requests"] == 8
    rows = env.store.ledger_entries(key.id)
    assert len(rows) == 8, rows
    assert [r["state"] for r in rows] == ["interrupted"] * 8
    for row in rows:  # charged the reservation: an upper bound of what the backend generated
        assert row["prompt_tokens"] + row["completion_tokens"] == row["reserved_tokens"]
        assert row["reserved_tokens"] >= 3000
    assert env.store.spend(key.id).day_tokens == sum(r["reserved_tokens"] for r in rows)


def test_a_prompt_past_the_context_is_refused_before_the_backend(env: Env) -> None:
    """Item 3, gateway part: the stand-in serves a 4,096-token context; a 3 MB prompt has at
    least 3 MB / 256 bytes = 12,288 tokens, so the gateway answers without forwarding."""
    _key, secret = env.store.create_key("huge", "client")
    huge = {**body(0, False), "messages": [{"role": "user", "content": "x " * 1_500_000}]}
    before = httpx.get(f"{env.backend_url}/metrics").text
    with httpx.Client(base_url=env.url, timeout=30) as client:
        r = client.post("/v1/chat/completions", json=huge, headers=env.headers(secret))
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["code"] == "context_length_exceeded"
        assert error["type"] == "invalid_request_error"
        assert "4096" in error["message"]
        # A prompt just over the context but under the cheap bound: the backend's exact 400.
        near = {**body(0, False), "messages": [{"role": "user", "content": "x " * 5000}]}
        r = client.post("/v1/chat/completions", json=near, headers=env.headers(secret))
        assert r.status_code == 400 and "maximum context length" in r.text
    after = httpx.get(f"{env.backend_url}/metrics").text
    assert _prompt_tokens(after) - _prompt_tokens(before) == 0  # neither reached generation


def _prompt_tokens(metrics: str) -> float:
    for line in metrics.splitlines():
        if line.startswith("vllm:prompt_tokens_total"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("no vllm:prompt_tokens_total")


def test_metrics_need_the_metrics_scope_and_show_key_ids(env: Env) -> None:
    plain, plain_secret = env.store.create_key("plain-client", "client")
    httpx.post(
        f"{env.url}/v1/chat/completions",
        json=body(0, False),
        headers=env.headers(plain_secret),
        timeout=30,
    )
    anonymous = httpx.get(f"{env.url}/metrics")
    assert anonymous.status_code == 401
    scraper, scraper_secret = env.store.create_key("scraper", "client", scopes=["metrics"])
    assert set(anonymous.json()["error"]) == {"message", "type", "param", "code"}
    unscoped = httpx.get(f"{env.url}/metrics", headers=env.headers(plain_secret))
    assert unscoped.status_code == 403
    assert unscoped.json()["error"]["code"] == "insufficient_scope"
    scoped = httpx.get(f"{env.url}/metrics", headers=env.headers(scraper_secret))
    assert scoped.status_code == 200
    assert f'key="{plain.id}"' in scoped.text
    # Series carry key ids; the names are only in the info gauge a dashboard joins on (re-read
    # every few seconds: a key just created shows there within that).
    info = f'appliance_key_info{{key="{plain.id}",name="plain-client",owner_kind="client"}} 1.0'
    deadline = time.monotonic() + 10
    while info not in scoped.text and time.monotonic() < deadline:
        time.sleep(0.5)
        scoped = httpx.get(f"{env.url}/metrics", headers=env.headers(scraper_secret))
    assert info in scoped.text
    for line in scoped.text.splitlines():
        if "plain-client" in line or f'name="{scraper.name}"' in line:
            assert line.startswith("appliance_key_info{"), line
