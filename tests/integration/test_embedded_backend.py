"""The embedded backend as a real server process with the real model (SmolLM2-135M, GGUF).

Driven through the official `openai` client and raw httpx, as the gateway and agents will. The
converted weights are cached in pytest's cache dir (.pytest_cache/, git-ignored) so only the
first run pays the ~20 s GGUF conversion.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from inference.embedded import weights  # noqa: E402
from tests.embedded_fixtures import (  # noqa: E402
    CHAT,
    MODEL,
    chat,
    metric,
    start_server,
    stop_server,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


# -- basic routes ------------------------------------------------------------------------------


def test_models_health_version(client: openai.OpenAI, server: str) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    card = httpx.get(f"{server}/v1/models").json()["data"][0]
    assert card["root"].startswith("SmolLM2-135M-Instruct")
    assert card["owned_by"] and card["max_model_len"] == 32768  # 8,192 native, RoPE-scaled x4
    assert httpx.get(f"{server}/health").status_code == 200
    assert httpx.get(f"{server}/version").json()["version"]


# -- chat ----------------------------------------------------------------------------------------
def test_chat_returns_real_text_and_tokenizer_consistent_usage(
    client: openai.OpenAI, tokenizer: object
) -> None:
    resp = chat(client, max_tokens=12)
    choice = resp.choices[0]
    text = choice.message.content
    assert choice.message.role == "assistant"
    assert re.search(r"[A-Za-z]{3}", text), text
    prompt_ids = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True)
    prompt_ids = prompt_ids if isinstance(prompt_ids, list) else prompt_ids["input_ids"]
    assert resp.usage.prompt_tokens == len(prompt_ids)
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    if choice.finish_reason == "length":
        assert resp.usage.completion_tokens == 12
        # the text re-tokenises to about as many tokens (BPE may merge differently at the edges)
        assert abs(len(tokenizer.encode(text, add_special_tokens=False)) - 12) <= 2
    else:
        assert choice.finish_reason == "stop" and resp.usage.completion_tokens <= 12


def test_stream_equals_non_stream_and_usage_chunk(client: openai.OpenAI) -> None:
    whole = chat(client, seed=5)
    chunks = list(chat(client, seed=5, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == whole.choices[0].finish_reason and set(finishes[:-1]) == {None}
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.prompt_tokens == whole.usage.prompt_tokens
    assert last.usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_raw_sse_framing(server: str) -> None:
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 3, "stream": True}
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    for ev in events[:-2]:
        assert ev.startswith("data: ")
        assert json.loads(ev[6:])["object"] == "chat.completion.chunk"


# -- sampling controls ---------------------------------------------------------------------------
def test_max_tokens_one_is_length(client: openai.OpenAI) -> None:
    resp = chat(client, max_tokens=1)
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage.completion_tokens == 1


def test_stop_string_cuts_before_it(client: openai.OpenAI) -> None:
    full = chat(client, max_tokens=24).choices[0].message.content
    words = re.findall(r"[A-Za-z]{4,}", full)
    assert len(words) >= 2, full
    stop = words[1]
    resp = chat(client, max_tokens=24, stop=[stop, "never-appears"])
    choice = resp.choices[0]
    assert choice.finish_reason == "stop"
    assert choice.message.content == full[: full.index(stop)]
    assert choice.model_extra.get("stop_reason") == stop


def test_seed_reproduces_sampled_output(client: openai.OpenAI) -> None:
    def sampled(seed: int) -> str:
        return (
            chat(client, temperature=1.0, top_p=0.95, seed=seed, max_tokens=16)
            .choices[0]
            .message.content
        )

    first = sampled(1234)
    assert sampled(1234) == first
    assert any(sampled(s) != first for s in (1, 2, 3))


def test_completions_plain_and_streamed(client: openai.OpenAI) -> None:
    args = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 6, "temperature": 0}
    resp = client.completions.create(**args)
    text = resp.choices[0].text
    assert "Paris" in text
    assert resp.usage.completion_tokens == 6 and resp.choices[0].finish_reason == "length"
    streamed = list(client.completions.create(**args, stream=True))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == text


# -- errors ----------------------------------------------------------------------------------------
def test_context_length_is_400_in_vllms_words(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        chat(client, max_tokens=40000)
    assert err.value.status_code == 400
    message = err.value.body["message"]
    assert re.fullmatch(
        r"This model's maximum context length is 32768 tokens\. However, you requested \d+ tokens "
        r"\(\d+ in the messages, 40000 in the completion\)\. Please reduce the length of the "
        r"messages or completion\.",
        message,
    ), message


def test_a_40k_prompt_is_400_in_vllms_words(server: str, tokenizer: object) -> None:
    ids = long_prompt(tokenizer, 40000)
    body = {"model": MODEL, "prompt": ids, "max_tokens": None}
    r = httpx.post(f"{server}/v1/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"] == (
        f"This model's maximum context length is 32768 tokens. However, your request has "
        f"{len(ids)} input tokens. Please reduce the length of the input messages."
    )


def long_prompt(tokenizer: object, n: int) -> list[int]:
    """~n tokens of real English (license texts, repeated), as token ids."""
    text = "".join(p.read_text() for p in sorted(Path("/usr/share/common-licenses").glob("*")))
    if not text:
        text = "The quick brown fox jumps over the lazy dog. " * 1000
    ids = tokenizer.encode(text, add_special_tokens=False)
    while len(ids) < n:
        ids += ids
    return ids[:n]


def test_12k_prompt_is_served_and_a_prefix_cache_hit_gives_the_same_output(
    server: str, tokenizer: object
) -> None:
    """Beyond the native 8,192; the second, identical request reuses all but the last token
    from the prefix cache (usage.prompt_tokens_details.cached_tokens, vLLM's counters) and,
    greedy, answers the same."""
    before = httpx.get(f"{server}/metrics").text
    ids = [*long_prompt(tokenizer, 12000), *tokenizer.encode("\n\nIn summary,")]
    body = {"model": MODEL, "prompt": ids, "max_tokens": 8, "temperature": 0}
    with httpx.Client(base_url=server, timeout=600) as http:
        cold = http.post("/v1/completions", json=body).json()
        start = time.monotonic()
        warm = http.post("/v1/completions", json=body).json()
        warm_s = time.monotonic() - start
    assert cold["usage"]["prompt_tokens"] == len(ids) > 12000
    assert cold["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    assert warm["usage"]["prompt_tokens_details"] == {"cached_tokens": len(ids) - 1}
    assert warm["choices"][0]["text"] == cold["choices"][0]["text"]
    assert warm_s < 10  # vs. about a minute of prefill on two cores
    after = httpx.get(f"{server}/metrics").text
    hits, queries = "vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total"
    assert metric(after, hits) - metric(before, hits) == len(ids) - 1
    assert metric(after, queries) - metric(before, queries) == 2 * len(ids)


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="nope", messages=CHAT, max_tokens=1)
    assert err.value.body["type"] == "NotFoundError"


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b'{"messages": "hi"}',
        b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": "many"}',
        b'{"messages": [{"role": "user", "content": "x"}], "temperature": -1}',
        b'{"model": "nemotron"}',
    ],
)
def test_malformed_body_is_400_in_openai_shape(server: str, body: bytes) -> None:
    r = httpx.post(
        f"{server}/v1/chat/completions",
        content=body,
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert r.status_code == 400
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == 400


# -- metrics, concurrency, cancellation ------------------------------------------------------------
def test_metrics_names_and_counters_increase(client: openai.OpenAI, server: str) -> None:
    before = httpx.get(f"{server}/metrics").text
    for name in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        "vllm:request_success_total",
        "vllm:time_to_first_token_seconds_bucket",
        "vllm:e2e_request_latency_seconds_bucket",
        "vllm:inter_token_latency_seconds_bucket",
    ):
        assert f"{name}{{" in before and f'model_name="{MODEL}"' in before, name
    resp = chat(client, max_tokens=5)
    after = httpx.get(f"{server}/metrics").text
    gen = "vllm:generation_tokens_total"
    assert metric(after, gen) - metric(before, gen) == resp.usage.completion_tokens
    prompt = "vllm:prompt_tokens_total"
    assert metric(after, prompt) - metric(before, prompt) == resp.usage.prompt_tokens
    reason = resp.choices[0].finish_reason
    success = "vllm:request_success_total"
    assert metric(after, success, finished_reason=reason) == (
        metric(before, success, finished_reason=reason) + 1
    )
    ttft = "vllm:time_to_first_token_seconds_count"
    assert metric(after, ttft) == metric(before, ttft) + 1


def test_concurrent_streams_all_complete(server: str) -> None:
    async def one(client: openai.AsyncOpenAI, i: int) -> tuple[str, str | None]:
        stream = await client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": f"Say the number {i}."}],
            max_tokens=8,
            temperature=0,
            stream=True,
        )
        text, finish = [], None
        async for chunk in stream:
            if chunk.choices:
                text.append(chunk.choices[0].delta.content or "")
                finish = chunk.choices[0].finish_reason or finish
        return "".join(text), finish

    async def main() -> list[tuple[str, str | None]]:
        async with openai.AsyncOpenAI(
            base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120
        ) as client:
            return await asyncio.gather(*(one(client, i) for i in range(12)))

    results = asyncio.run(main())
    assert len(results) == 12
    assert all(finish in ("stop", "length") and text for text, finish in results)


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_cancels_generation(server: str, stream: bool) -> None:
    success = "vllm:request_success_total"
    aborted_before = metric(httpx.get(f"{server}/metrics").text, success, finished_reason="abort")
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 4000, "ignore_eos": True,
            "stream": stream}  # fmt: skip
    if stream:
        with httpx.stream("POST", f"{server}/v1/chat/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            for _ in range(4):
                next(lines)
    else:
        with pytest.raises(httpx.ReadTimeout):  # the client gives up, closing the connection
            httpx.post(f"{server}/v1/chat/completions", json=body, timeout=1.5)
    # 4000 tokens would take minutes; a cancelled request is gone within a decode step or two.
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        text = httpx.get(f"{server}/metrics").text
        running = metric(text, "vllm:num_requests_running")
        aborted = metric(text, success, finished_reason="abort")
        if running == 0 and aborted == aborted_before + 1:
            break
        time.sleep(0.1)
    assert running == 0
    assert aborted == aborted_before + 1


def test_overload_is_503_and_the_server_survives(weights_cache: Path, tmp_path: Path) -> None:
    proc, url = start_server(
        weights_cache, tmp_path / "small.log", "--max-num-seqs", "1", "--max-waiting", "1"
    )
    try:
        body = {"model": MODEL, "messages": CHAT, "max_tokens": 400, "ignore_eos": True,
                "stream": True}  # fmt: skip
        with httpx.Client(base_url=url, timeout=60) as http:
            with http.stream("POST", "/v1/chat/completions", json=body) as running:
                next(running.iter_lines())  # admitted and decoding
                with http.stream("POST", "/v1/chat/completions", json=body) as waiting:
                    assert waiting.status_code == 200
                    r = http.post("/v1/chat/completions", json={**body, "stream": False})
                    assert r.status_code == 503
                    assert r.json()["error"]["type"] == "ServiceUnavailableError"
            # The closed streams are cancelled server-side within a step; then there is room.
            deadline = time.monotonic() + 15
            while True:
                ok = http.post(
                    "/v1/chat/completions", json={**body, "max_tokens": 2, "stream": False}
                )
                if ok.status_code != 503 or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            assert ok.status_code == 200
            assert http.get("/health").status_code == 200
    finally:
        stop_server(proc)


def test_server_log_is_brief(server: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    logs = list(Path(tmp_path_factory.getbasetemp()).glob("embedded*/server.log"))
    text = logs[0].read_text()
    assert "embedded: loaded SmolLM2-135M-Instruct" in text and "serving 'nemotron'" in text
    assert len(text.splitlines()) <= 10, text


def test_weights_cache_is_written_once(weights_cache: Path, server: str) -> None:
    cached = weights.cache_dir_for(weights.resolve(None), weights_cache)
    assert (cached / "model.safetensors").stat().st_size > 100_000_000
    assert (cached / "tokenizer.json").exists()
    assert not [p for p in weights_cache.iterdir() if p.name.startswith(".")]  # no leftovers
    assert os.access(cached / "appliance-source.json", os.R_OK)
