"""inference.local end to end: the gateway as a real process in front of the stand-in vLLM process,
driven by the official openai client."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import httpx
import openai
import pytest

from appliance.store.inference_store import InferenceStore
from inference.ports import Budget
from tests.helpers import free_port
from tests.integration.gateway_harness import start_fake_vllm, start_gateway, stop

pytestmark = pytest.mark.integration

PRICE = {"prompt_per_1m": 1000.0, "completion_per_1m": 2000.0}  # 0.001 / 0.002 a token
HI = [{"role": "user", "content": "hi there"}]  # 2 prompt tokens for the stand-in
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]


@dataclass
class Env:
    url: str
    store: InferenceStore
    hard_stops: Path

    def key(
        self, name: str, budget: Budget | None = None, models: list[str] | None = None
    ) -> tuple[str, str]:
        record, secret = self.store.create_key(name, "sandbox", models)
        if budget is not None:
            self.store.set_budget(replace(budget, key_id=record.id))
        return record.id, secret

    def client(self, secret: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=secret, max_retries=0)

    def totals(self, key_id: str, requests: int, timeout: float = 30.0) -> dict[str, float]:
        """The key's ledger totals once `requests` rows are in and settled (the writer batches;
        on a loaded machine that can take seconds)."""
        deadline = time.monotonic() + timeout
        while True:
            totals = self.store.usage_totals(key_id)
            rows = self.store.ledger_entries(key_id)
            settled = all(r["state"] != "open" for r in rows)  # rows are written at admission
            if (totals["requests"] >= requests and settled) or time.monotonic() > deadline:
                return totals
            time.sleep(0.02)

    def metrics(self) -> str:
        """A scrape with a key that has the `metrics` scope."""
        name = f"scraper-{len(self.store.list_keys())}"
        _, secret = self.store.create_key(name, "client", scopes=["metrics"])
        resp = httpx.get(f"{self.url}/metrics", headers={"authorization": f"Bearer {secret}"})
        assert resp.status_code == 200, resp.text
        return resp.text


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    state = tmp_path_factory.mktemp("state")
    backend_port, gateway_port = free_port(), free_port()
    backend = start_fake_vllm(backend_port, {"FAKE_VLLM_TOKEN_DELAY": "0.002"})
    settings = {
        "backend_url": f"http://127.0.0.1:{backend_port}",
        "aliases": {"smol": "nemotron"},
        "prices": {"nemotron": PRICE},
        # The stand-in counts words: the body's length alone bounds its prompts (the default
        # allowance is for real chat templates), so small budgets admit requests here.
        "prompt_overhead_tokens": 0,
    }
    hard_stops = state / "hard-stops.txt"
    gateway = start_gateway(state, gateway_port, settings, hard_stops)
    store = InferenceStore(state)
    try:
        yield Env(f"http://127.0.0.1:{gateway_port}", store, hard_stops)
    finally:
        stop(gateway)
        stop(backend)
        store.close()


def test_models_chat_and_alias(env: Env) -> None:
    key_id, secret = env.key("basic")
    client = env.client(secret)
    assert [m.id for m in client.models.list()] == ["nemotron", "smol"]
    reply = client.chat.completions.create(model="smol", messages=HI, max_tokens=3)
    assert reply.choices[0].message.content == "tok0 tok1 tok2"
    assert reply.usage is not None and reply.usage.prompt_tokens == 2
    assert reply.usage.completion_tokens == 3
    totals = env.totals(key_id, 1)
    assert (totals["prompt_tokens"], totals["completion_tokens"]) == (2, 3)
    assert totals["cost"] == pytest.approx(2 * 0.001 + 3 * 0.002)


def test_stream_carries_usage_only_when_asked(env: Env) -> None:
    key_id, secret = env.key("streamer")
    client = env.client(secret)
    plain = list(
        client.chat.completions.create(model="nemotron", messages=HI, max_tokens=4, stream=True)
    )
    assert all(c.usage is None and c.choices for c in plain)
    assert "".join(c.choices[0].delta.content or "" for c in plain) == "tok0 tok1 tok2 tok3"
    with_usage = list(
        client.chat.completions.create(
            model="nemotron",
            messages=HI,
            max_tokens=4,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    last = with_usage[-1]
    assert last.choices == [] and last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (2, 4)
    assert all(c.usage is None for c in with_usage[:-1])
    totals = env.totals(key_id, 2)
    assert (totals["prompt_tokens"], totals["completion_tokens"]) == (4, 8)
    assert [r.stream for r in env.store.usage_rows(key_id)] == [True, True]


def test_completions_stream_and_not(env: Env) -> None:
    _, secret = env.key("completer")
    client = env.client(secret)
    reply = client.completions.create(model="nemotron", prompt="a b c", max_tokens=3)
    assert reply.choices[0].text == "tok0 tok1 tok2" and reply.usage is not None
    chunks = list(
        client.completions.create(
            model="nemotron",
            prompt="a b c",
            max_tokens=3,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "tok0 tok1 tok2"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3


def test_tool_calls_pass_through(env: Env) -> None:
    _, secret = env.key("tooler")
    client = env.client(secret)
    messages = [{"role": "user", "content": "please call a tool for Paris"}]
    reply = client.chat.completions.create(model="nemotron", messages=messages, tools=TOOLS)
    call = reply.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {
        "city": "tok0"
    }
    assert reply.choices[0].finish_reason == "tool_calls"
    chunks = list(
        client.chat.completions.create(
            model="nemotron",
            messages=messages,
            tools=TOOLS,
            stream=True,
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
        )
    )
    deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert deltas and deltas[0].function.name == "get_weather"


def test_errors_in_openai_shape(env: Env) -> None:
    key_id, secret = env.key("errors")
    with pytest.raises(openai.AuthenticationError):
        env.client("sk-app-wrong").models.list()
    client = env.client(secret)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-9", messages=HI)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model="nemotron", messages=HI, temperature=5)
    raw = httpx.post(
        f"{env.url}/v1/chat/completions",
        content=b'{"model": "nemotron", "messages": [',
        headers={"authorization": f"Bearer {secret}", "content-type": "application/json"},
    )
    assert raw.status_code == 400 and raw.json()["error"]["code"] == "invalid_json"
    env.store.revoke_key(key_id)
    time.sleep(1.1)  # the gateway's auth cache lives a second
    with pytest.raises(openai.AuthenticationError, match="revoked"):
        client.models.list()


def test_a_key_limited_to_other_models_is_refused_403(env: Env) -> None:
    _, scoped = env.key("scoped", models=["smol"])
    client = env.client(scoped)
    assert [m.id for m in client.models.list()] == ["nemotron", "smol"]
    reply = client.chat.completions.create(model="nemotron", messages=HI, max_tokens=2)
    assert reply.choices[0].message.content == "tok0 tok1"  # `smol` names this same model
    key_id, locked = env.key("locked", models=["elsewhere"])
    client = env.client(locked)
    assert [m.id for m in client.models.list()] == []
    with pytest.raises(openai.PermissionDeniedError, match="not allowed for this key") as info:
        client.chat.completions.create(model="smol", messages=HI)
    assert info.value.code == "model_not_allowed"
    assert env.totals(key_id, 1)["requests"] == 1  # refused, and in the ledger like a 404
    assert [(r.status, r.model) for r in env.store.usage_rows(key_id)] == [(403, "nemotron")]
    [denied] = [e for e in env.store.audit_events("model.deny") if e["key_id"] == key_id]
    assert (denied["model"], denied["served"]) == ("smol", "nemotron")


def test_budget_warns_at_80_percent_then_refuses(env: Env) -> None:
    key_id, secret = env.key("budgeted", Budget("", daily_tokens=1000))
    client = env.client(secret)
    headers: list[str | None] = []
    for _ in range(40):  # 2 prompt + 40 completion tokens each, reserved ~125 each
        try:
            raw = client.chat.completions.with_raw_response.create(
                model="nemotron", messages=HI, max_tokens=40
            )
        except openai.RateLimitError:
            break
        raw.parse()
        headers.append(raw.headers.get("x-appliance-budget-warning"))
        env.totals(key_id, len(headers))
    else:
        raise AssertionError("never refused")
    rows = [r for r in env.store.ledger_entries(key_id) if r["state"] == "ok"]
    assert len(rows) == len(headers)
    # The warning counts spend + this request's reservation: from the first request whose
    # reservation reached 80 % of the budget on.
    spent = 0
    for row, header in zip(rows, headers, strict=True):
        percent = int((spent + row["reserved_tokens"]) / 10)
        assert header == (f"daily tokens {percent}% of 1000" if percent >= 80 else None)
        spent += row["prompt_tokens"] + row["completion_tokens"]
    assert spent <= 1000 and headers[-1] is not None
    with pytest.raises(openai.RateLimitError) as refused:
        client.chat.completions.create(model="nemotron", messages=HI, max_tokens=40)
    message = refused.value.message
    assert f"daily tokens {spent} of 1000" in message and "resets at" in message
    assert int(refused.value.response.headers["retry-after"]) > 0
    with pytest.raises(openai.RateLimitError):  # streams are refused before they start
        client.chat.completions.create(model="nemotron", messages=HI, stream=True)
    warnings = env.store.audit_events("budget.warning")
    [warning] = [e for e in warnings if e["key_id"] == key_id]  # once a period
    assert warning["budget"] == "daily_tokens" and warning["percent"] >= 80
    metrics = env.metrics()
    assert f'appliance_gateway_budget_state{{key="{key_id}"}} 2.0' in metrics
    assert (
        f'appliance_gateway_budget_warnings_total{{budget="daily_tokens",key="{key_id}"}} 1.0'
        in metrics
    )


def test_monthly_cost_cap_hard_stops_once(env: Env) -> None:
    key_id, secret = env.key("capped", Budget("", monthly_cost=1.0))
    client = env.client(secret)
    for _ in range(40):  # 0.062 each (2 x 0.001 + 30 x 0.002) until it no longer fits
        try:
            client.chat.completions.create(model="nemotron", messages=HI, max_tokens=30)
        except openai.RateLimitError as exc:
            assert "monthly cost" in exc.message
            break
        env.totals(key_id, 1)
    else:
        raise AssertionError("never refused")
    assert env.store.spend(key_id).month_cost <= 1.0
    for _ in range(3):
        with pytest.raises(openai.RateLimitError, match="monthly cost"):
            client.chat.completions.create(model="nemotron", messages=HI, max_tokens=1)
    deadline = time.monotonic() + 5
    while not env.hard_stops.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert env.hard_stops.read_text().split() == [key_id]
    assert [e["key_id"] for e in env.store.audit_events("budget.hard_stop")] == [key_id]


def test_64_concurrent_streams_and_ledger_totals(env: Env) -> None:
    key_id, secret = env.key("swarm")

    async def one(client: openai.AsyncOpenAI, i: int) -> tuple[int, int, str]:
        stream = await client.chat.completions.create(
            model="nemotron",
            messages=[{"role": "user", "content": "word " * (i % 7 + 1)}],
            max_tokens=10 + i % 5,
            stream=True,
            stream_options={"include_usage": True},
        )
        text, usage = [], None
        async for chunk in stream:
            if chunk.choices:
                text.append(chunk.choices[0].delta.content or "")
            if chunk.usage:
                usage = chunk.usage
        assert usage is not None
        return usage.prompt_tokens, usage.completion_tokens, "".join(text)

    async def swarm() -> list[tuple[int, int, str] | BaseException]:
        client = openai.AsyncOpenAI(base_url=f"{env.url}/v1", api_key=secret, max_retries=0)
        async with client:
            return await asyncio.gather(
                *(one(client, i) for i in range(64)), return_exceptions=True
            )

    results = asyncio.run(swarm())
    errors = [r for r in results if isinstance(r, BaseException)]
    assert errors == []
    ok = [r for r in results if not isinstance(r, BaseException)]
    assert all(len(text.split()) == completion for _, completion, text in ok)
    totals = env.totals(key_id, 64)
    assert totals["requests"] == 64
    assert totals["prompt_tokens"] == sum(p for p, _, _ in ok)
    assert totals["completion_tokens"] == sum(c for _, c, _ in ok)
    assert env.store.spend(key_id).day_tokens == sum(p + c for p, c, _ in ok)


def test_metrics_and_health(env: Env) -> None:
    key_id, secret = env.key("metered")
    env.client(secret).chat.completions.create(model="nemotron", messages=HI, max_tokens=2)
    assert httpx.get(f"{env.url}/health/live").status_code == 200
    assert httpx.get(f"{env.url}/health/ready").json()["status"] == "ready"
    text = env.metrics()
    for line in (
        f'appliance_gateway_prompt_tokens_total{{key="{key_id}",model="nemotron"}} 2.0',
        f'appliance_gateway_completion_tokens_total{{key="{key_id}",model="nemotron"}} 2.0',
        'appliance_gateway_backend_up{backend="local"} 1.0',
        "appliance_gateway_request_seconds_bucket",
        "appliance_gateway_time_to_first_token_seconds_bucket",
        f'appliance_gateway_requests_total{{key="{key_id}",model="nemotron",'
        'route="/v1/chat/completions",status="200"} 1.0',
    ):
        assert line in text
    assert 'key="metered"' not in text  # the key label is the id (names: appliance_key_info)
