"""Budget reservations at their edges (issue 11, items 2 and 7), with real processes: the gateway
(as `appliance serve gateway` runs it) in front of the stand-in vLLM.

Each test tries to make a request spend more than its key's budget, or its reservation, allows:
a completion-length field the backend does not read, a caller-supplied chat template, a route
to an upstream whose context is only assumed, a fallback, an answer without usage, a cut stream
that carried several tokens per event, n > 1 and lists of prompts. The ledger must never show
more than the cap, nor any request more than its reservation.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
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


@dataclass
class Env:
    url: str
    store: InferenceStore

    def key(self, name: str, daily_tokens: int) -> tuple[str, str]:
        key, secret = self.store.create_key(name, "client")
        self.store.set_budget(Budget(key.id, daily_tokens=daily_tokens))
        return key.id, secret

    def post(self, secret: str, path: str, body: dict[str, Any]) -> httpx.Response:
        headers = {"authorization": f"Bearer {secret}"}
        return httpx.post(f"{self.url}{path}", json=body, headers=headers, timeout=60)

    def rows(self, key_id: str, n: int = 1, timeout: float = 10.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            rows = self.store.ledger_entries(key_id)
            settled = [r for r in rows if r["state"] != "open"]
            if len(settled) >= n or time.monotonic() > deadline:
                return rows
            time.sleep(0.05)

    def assert_within(self, key_id: str, cap: int, n: int = 1) -> list[dict[str, Any]]:
        """Every row within its reservation, and the key's spend within the cap."""
        rows = self.rows(key_id, n)
        assert rows and all(r["state"] != "open" for r in rows), rows
        for r in rows:
            used = r["prompt_tokens"] + r["completion_tokens"]
            assert used <= r["reserved_tokens"], r
        spent = sum(r["prompt_tokens"] + r["completion_tokens"] for r in rows)
        assert spent <= cap, f"spent {spent} of a {cap}-token budget"
        return rows


@contextmanager
def gateway(
    tmp_path: Path,
    backend_env: dict[str, str] | None = None,
    settings: dict[str, Any] | None = None,
    upstream: dict[str, Any] | None = None,
    local_len: int = 4096,
) -> Iterator[Env]:
    """The gateway in front of a stand-in vLLM (`local_len` tokens of context); with `upstream`,
    a second stand-in serving `up-model` as the upstream (those settings merged in)."""
    with ExitStack() as stack:
        port = free_port()
        local = start_fake_vllm(port, backend_env, args=["--max-model-len", str(local_len)])
        stack.callback(stop, local)
        gw_settings: dict[str, Any] = {"backend_url": f"http://127.0.0.1:{port}"}
        if upstream is not None:
            up_port = free_port()
            up = start_fake_vllm(up_port, backend_env, name="up-model")
            stack.callback(stop, up)
            gw_settings["upstream"] = {
                "base_url": f"http://127.0.0.1:{up_port}/v1",
                "models": ["up-model"],
                **upstream,
            }
        gw_settings.update(settings or {})
        store = InferenceStore(tmp_path)
        stack.callback(store.close)
        gw_port = free_port()
        stack.callback(stop, start_gateway(tmp_path, gw_port, gw_settings))
        yield Env(f"http://127.0.0.1:{gw_port}", store)


def chat(content: str = "hello there", **fields: Any) -> dict[str, Any]:
    return {"model": "nemotron", "messages": [{"role": "user", "content": content}], **fields}


# -- item 1: the completion length the backend reads ---------------------------------------------


def test_max_completion_tokens_cannot_smuggle_a_larger_max_tokens(tmp_path: Path) -> None:
    """vLLM's completions read max_tokens only: a small max_completion_tokens beside it must not
    shrink the reservation (it reserved one token per choice and generated 4,000)."""
    with gateway(tmp_path) as env:
        key_id, secret = env.key("smuggler", 1000)
        body = {"model": "nemotron", "prompt": "x", "max_completion_tokens": 1, "max_tokens": 4000}
        r = env.post(secret, "/v1/completions", body)
        assert r.status_code in (200, 429), r.text
        rows = env.assert_within(key_id, 1000)
        if r.status_code == 200:  # admitted with a cap the backend honoured
            assert rows[0]["completion_tokens"] == r.json()["usage"]["completion_tokens"]


# -- item 2: a caller's chat template -------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"chat_template": "{% for i in range(99) %}{{ messages }}{% endfor %}"}, "chat_template"),
        (
            {"chat_template_kwargs": {"chat_template": "{{ messages * 300 }}"}},
            "chat_template_kwargs",
        ),
        ({"chat_template_kwargs": {"add_generation_prompt": False}}, "chat_template_kwargs"),
        ({"chat_template_kwargs": {"tools": [{"x": 1}] * 3}}, "chat_template_kwargs"),
        ({"chat_template_kwargs": {"enable_thinking": "x" * 50}}, "chat_template_kwargs"),
        ({"chat_template_kwargs": "enable_thinking"}, "chat_template_kwargs"),
    ],
)
def test_a_callers_chat_template_is_refused(
    tmp_path: Path, extra: dict[str, Any], param: str
) -> None:
    with gateway(tmp_path) as env:
        key_id, secret = env.key("templater", 100_000)
        r = env.post(secret, "/v1/chat/completions", chat(max_tokens=5, **extra))
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["type"] == "invalid_request_error" and error["param"] == param, error
        rows = env.rows(key_id)
        assert [(row["state"], row["reserved_tokens"]) for row in rows] == [("refused", 0)]


def test_the_models_own_template_switches_pass(tmp_path: Path) -> None:
    with gateway(tmp_path) as env:
        _key_id, secret = env.key("thinker", 100_000)
        for kwargs in ({"enable_thinking": False}, {"thinking": True}, {}):
            body = chat(max_tokens=5, chat_template_kwargs=kwargs)
            r = env.post(secret, "/v1/chat/completions", body)
            assert r.status_code == 200, (kwargs, r.text)


# -- items 3 and 4: no max_tokens, upstream routes and the fallback -------------------------------


def test_no_max_tokens_on_an_upstream_route_is_capped_by_what_was_reserved(
    tmp_path: Path,
) -> None:
    """The upstream's context is only assumed (upstream_max_model_len): the gateway must send the
    bound it reserved, or the upstream generates what it likes (the stand-in: 16 tokens)."""
    settings = {"upstream_max_model_len": 10}
    with gateway(tmp_path, settings=settings, upstream={}) as env:
        key_id, secret = env.key("upstreamer", 1_000_000)
        body = {**chat(), "model": "up-model"}
        r = env.post(secret, "/v1/chat/completions", body)
        assert r.status_code == 200, r.text
        assert r.headers["x-appliance-route"] == "upstream"
        (row,) = env.assert_within(key_id, 1_000_000)
        assert 1 <= row["completion_tokens"] <= 10


def test_fallback_with_a_budget_sends_the_local_backend_what_its_context_holds(
    tmp_path: Path,
) -> None:
    """With a fallback the reservation covers the larger (upstream) context; the max_tokens sent
    to the local backend must still fit the local model's context (4,096 here)."""
    upstream = {"fallback": True}
    with gateway(tmp_path, upstream=upstream, settings={"upstream_max_model_len": 131072}) as env:
        key_id, secret = env.key("falls-back", 100_000)
        r = env.post(secret, "/v1/chat/completions", chat())
        assert r.status_code == 200, r.text
        assert r.headers["x-appliance-route"] == "local"
        (row,) = env.assert_within(key_id, 100_000)
        assert row["completion_tokens"] < 4096


def test_no_max_tokens_with_a_small_budget_stays_under_the_cap(tmp_path: Path) -> None:
    with gateway(tmp_path) as env:
        key_id, secret = env.key("unbounded", 600)
        for _ in range(4):
            r = env.post(secret, "/v1/chat/completions", chat())
            assert r.status_code in (200, 429), r.text
        env.assert_within(key_id, 600, n=4)


# -- item 5: an answer without usage --------------------------------------------------------------


def test_an_answer_without_usage_is_charged_its_reservation(tmp_path: Path) -> None:
    with gateway(tmp_path, {"FAKE_VLLM_NO_USAGE": "1"}) as env:
        key_id, secret = env.key("no-usage", 100_000)
        r = env.post(secret, "/v1/chat/completions", chat(max_tokens=50))
        assert r.status_code == 200, r.text
        assert "usage" not in r.json()
        (row,) = env.assert_within(key_id, 100_000)
        assert row["state"] == "ok"
        assert row["prompt_tokens"] + row["completion_tokens"] == row["reserved_tokens"]
        assert row["completion_tokens"] == 50


# -- item 6 and 11: cut streams ------------------------------------------------------------------


def _relayed_tokens(lines: Iterator[str]) -> int:
    """Words of generated text the client received (the stand-in's tokens are `tokN` words)."""
    count = 0
    for line in lines:
        if line.startswith("data: ") and "[DONE]" not in line:
            count += line.count("tok")
    return count


def test_a_stream_cut_with_several_tokens_an_event_is_charged_at_least_what_was_relayed(
    tmp_path: Path,
) -> None:
    """The backend sends 10 tokens an event and dies after 55: the client got 50 tokens in five
    events, so one token an event (5) undercounts."""
    backend = {"FAKE_VLLM_TOKENS_PER_EVENT": "10", "FAKE_VLLM_DIE_AFTER": "55"}
    with gateway(tmp_path, backend) as env:
        key_id, secret = env.key("batched", 100_000)
        headers = {"authorization": f"Bearer {secret}"}
        body = chat(max_tokens=200, stream=True)
        with httpx.stream(
            "POST", f"{env.url}/v1/chat/completions", json=body, headers=headers, timeout=30
        ) as r:
            relayed = _relayed_tokens(r.iter_lines())
        assert relayed == 50
        (row,) = env.assert_within(key_id, 100_000)
        assert row["state"] == "error"
        assert row["completion_tokens"] >= relayed


def test_a_stream_with_n_3_cut_before_its_usage_is_charged_within_the_cap(tmp_path: Path) -> None:
    with gateway(tmp_path, {"FAKE_VLLM_TOKEN_DELAY": "0.002"}) as env:
        key_id, secret = env.key("cut-n", 1000)
        headers = {"authorization": f"Bearer {secret}"}
        body = chat(max_tokens=250, n=3, stream=True)
        relayed = 0
        with httpx.stream(
            "POST", f"{env.url}/v1/chat/completions", json=body, headers=headers, timeout=30
        ) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                relayed += line.count("tok")
                if '"index": 1' in line and "tok5" in line:
                    break  # hang up in the second choice, long before the usage chunk
        (row,) = env.assert_within(key_id, 1000)
        assert row["state"] == "cancelled"
        assert row["completion_tokens"] >= relayed


# -- item 11: several completions per request -----------------------------------------------------


def test_n_choices_never_pass_the_cap(tmp_path: Path) -> None:
    with gateway(tmp_path) as env:
        key_id, secret = env.key("many", 1000)
        statuses = []
        for stream in (False, True, False):
            r = env.post(secret, "/v1/chat/completions", chat(max_tokens=300, n=4, stream=stream))
            statuses.append(r.status_code)
            if r.status_code == 200 and not stream:
                assert len(r.json()["choices"]) == 4
        assert statuses[0] == 200, statuses
        env.assert_within(key_id, 1000, n=3)


def test_a_list_of_prompts_never_passes_the_cap(tmp_path: Path) -> None:
    with gateway(tmp_path) as env:
        key_id, secret = env.key("batch", 1000)
        body = {"model": "nemotron", "prompt": ["a", "b c", "d"], "max_tokens": 500, "n": 2}
        r = env.post(secret, "/v1/completions", body)
        assert r.status_code == 200, r.text
        assert len(r.json()["choices"]) == 6
        env.assert_within(key_id, 1000)
