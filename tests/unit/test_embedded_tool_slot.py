"""The embedded server never drops a request's `tools` silently (issue 13, item 5): whether the
chat template has a tool slot is asked once per model, and a request whose tools it cannot show
gets the `x-appliance-notice` header (streamed or not) and a log line (a warning once, then debug).

Real tokenizers with real templates; the server in-process over a tiny random Llama (the real
model is exercised in tests/integration/test_embedded_backend.py).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
from starlette.testclient import TestClient

from inference.embedded import weights
from inference.embedded.engine import Engine
from inference.embedded.llama import FastLlama
from inference.embedded.server import create_app
from inference.embedded.tool_slot import ToolSlot, has_tool_slot
from inference.notices import NOTICE_HEADER, header_value
from tests.unit.test_embedded_engine import byte_tokenizer, tiny_llama

NO_SLOT = (  # SmolLM2-135M-Instruct's own template: messages only
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>\\n'}}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\\n"
    "{% endif %}"
)
WITH_SLOT = "{% if tools %}TOOLS: {{ tools | tojson }}\n{% endif %}" + NO_SLOT
SYSTEM_ONLY_SLOT = (  # tools go into the system turn, and only when there is one
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
    "{% if m['role'] == 'system' and tools %} (tools: {{ tools | length }}){% endif %}\n"
    "{% endfor %}"
)
TOOLS = [{"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]


def tokenizer(template: str | None) -> object:
    tok = byte_tokenizer()
    tok.chat_template = template
    return tok


@pytest.mark.parametrize(
    ("template", "slot"),
    [
        (NO_SLOT, False),
        (WITH_SLOT, True),
        (SYSTEM_ONLY_SLOT, True),
        (None, None),  # no template: nothing can be told
        ("{{ raise_exception('no') }}", None),  # fails on every probe
        ("{% if tools %}{{ raise_exception('no tools') }}{% endif %}" + NO_SLOT, None),
    ],
)
def test_the_tool_slot_is_told_from_the_rendered_text(template: str | None, slot: bool | None):
    assert has_tool_slot(tokenizer(template)) is slot


def test_a_notice_only_when_tools_are_dropped() -> None:
    dropping = ToolSlot("tiny", tokenizer(NO_SLOT))
    assert dropping.notice_for(None) is None and dropping.notice_for([]) is None
    assert dropping.notice_for(TOOLS) == "tools ignored: tiny's chat template has no tool slot"
    assert ToolSlot("tiny", tokenizer(WITH_SLOT)).notice_for(TOOLS) is None
    assert ToolSlot("tiny", tokenizer(None)).notice_for(TOOLS) is None  # unknown: no claim


def test_racing_requests_log_one_warning_then_debug(caplog: pytest.LogCaptureFixture) -> None:
    slot = ToolSlot("tiny", tokenizer(NO_SLOT))
    start = threading.Barrier(32)

    def request() -> None:
        start.wait()
        for _ in range(10):
            assert slot.notice_for(TOOLS)

    caplog.set_level(logging.DEBUG, logger="inference.embedded")
    threads = [threading.Thread(target=request) for _ in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    levels = [r.levelno for r in caplog.records if "no tool slot" in r.getMessage()]
    assert levels.count(logging.WARNING) == 1
    assert levels.count(logging.DEBUG) == 32 * 10 - 1


@pytest.mark.parametrize(
    "model", ["evil\r\nx-injected: 1", "modèle-ü-世界", "a" * 1000, "\x1b[31mred\x00"]
)
def test_a_hostile_model_name_makes_a_safe_header(model: str) -> None:
    value = ToolSlot(model, tokenizer(NO_SLOT)).notice_for(TOOLS)
    assert value is not None and len(value) <= 300
    assert value.isascii() and value.isprintable()  # no CR/LF: one header, one line
    assert value == header_value(value)


def test_only_the_shipped_gguf_is_the_demonstration_model(tmp_path: Path) -> None:
    other = tmp_path / "mine.gguf"
    other.write_bytes(b"GGUF")
    assert weights.resolve(other).demonstration is False
    try:
        shipped = weights.default_gguf()
    except weights.ModelNotFound:
        return
    assert weights.resolve(None).demonstration is True
    assert weights.resolve(shipped).demonstration is True


@pytest.fixture(scope="module")
def server() -> Iterator[TestClient]:
    engine = Engine(FastLlama(tiny_llama(), quant="none"), tokenizer(NO_SLOT), model_root="tiny")
    engine.start()
    try:
        with TestClient(create_app(engine, "m")) as client:
            yield client
    finally:
        engine.shutdown()


def chat(**extra: object) -> dict[str, object]:
    messages = [{"role": "user", "content": "hi"}]
    return {"model": "m", "messages": messages, "max_tokens": 3, **extra}


def test_the_server_says_so_in_a_header_streamed_or_not(server: TestClient) -> None:
    notice = "tools ignored: tiny's chat template has no tool slot"
    whole = server.post("/v1/chat/completions", json=chat(tools=TOOLS))
    assert whole.status_code == 200 and whole.headers[NOTICE_HEADER] == notice
    assert whole.json()["choices"][0]["message"]["role"] == "assistant"
    with server.stream("POST", "/v1/chat/completions", json=chat(tools=TOOLS, stream=True)) as r:
        assert r.status_code == 200 and r.headers[NOTICE_HEADER] == notice
        assert r.read().decode().endswith("data: [DONE]\n\n")
    for body in (chat(), chat(tools=[]), chat(stream=True)):
        assert NOTICE_HEADER not in server.post("/v1/chat/completions", json=body).headers


def test_a_refused_request_gets_no_notice(server: TestClient) -> None:
    r = server.post("/v1/chat/completions", json=chat(tools=TOOLS, max_tokens=10**6))
    assert r.status_code == 400 and NOTICE_HEADER not in r.headers


def test_the_model_card_tells_the_control_plane(server: TestClient) -> None:
    card = server.get("/v1/models").json()["data"][0]
    assert card["id"] == "m" and card["appliance"] == {"tools": False, "demonstration": False}
