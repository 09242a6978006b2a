"""The embedded server never drops `tools` silently: a model whose chat template has no tool
slot answers with an x-appliance-notice header (streamed or not), says so in its model card and
logs it once; inference.local relays that header from its local backend, never from an upstream.
The real SmolLM2 server: the session's (tests/integration/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.embedded_fixtures import CHAT, MODEL, chat
from tests.helpers import free_port

pytest.importorskip("torch")
pytest.importorskip("transformers")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TOOLS = [{"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]
NOTICE = "tools ignored: SmolLM2-135M-Instruct.Q4_1's chat template has no tool slot"


def test_tools_pass_through_to_the_template(client: openai.OpenAI) -> None:
    resp = chat(client, tools=TOOLS, max_tokens=4)
    assert resp.choices[0].message.role == "assistant"


def test_tools_the_template_cannot_show_are_named_not_dropped_silently(
    server: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """SmolLM2's template has no tool slot: a header on every such answer, streamed or not; the
    model card says so for the control plane; the log warns once, however many requests."""
    card = httpx.get(f"{server}/v1/models").json()["data"][0]
    assert card["appliance"] == {"tools": False, "demonstration": True}
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 2, "tools": TOOLS}
    for _ in range(3):
        r = httpx.post(f"{server}/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200 and r.headers["x-appliance-notice"] == NOTICE
    with httpx.stream(
        "POST", f"{server}/v1/chat/completions", json={**body, "stream": True}, timeout=60
    ) as r:
        assert r.headers["x-appliance-notice"] == NOTICE
        assert r.read().decode().endswith("data: [DONE]\n\n")
    plain = httpx.post(f"{server}/v1/chat/completions", json={**body, "tools": None}, timeout=60)
    assert plain.status_code == 200 and "x-appliance-notice" not in plain.headers
    log = next(Path(tmp_path_factory.getbasetemp()).glob("embedded*/server.log")).read_text()
    assert log.count("no tool slot") == 1, log


@pytest.fixture(scope="module")
def gateway(server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """inference.local (the gateway's own process) in front of the embedded server: URL, key."""
    from appliance.store.inference_store import InferenceStore
    from tests.integration.gateway_harness import start_gateway, stop

    state, port = tmp_path_factory.mktemp("gateway"), free_port()
    proc = start_gateway(state, port, {"backend_url": server, "served_model_name": MODEL})
    try:
        with InferenceStore(state) as store:
            secret = store.create_key("notice-test", "client")[1]
        yield f"http://127.0.0.1:{port}", secret
    finally:
        stop(proc)


def test_the_gateway_relays_the_notice(gateway: tuple[str, str]) -> None:
    url, secret = gateway
    headers = {"authorization": f"Bearer {secret}"}
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 2, "tools": TOOLS}
    r = httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=60)
    assert r.status_code == 200 and r.headers["x-appliance-notice"] == NOTICE
    assert r.headers["x-appliance-route"] == "local"
    streamed = {**body, "stream": True}
    with httpx.stream(
        "POST", f"{url}/v1/chat/completions", json=streamed, headers=headers, timeout=60
    ) as r:
        assert r.status_code == 200 and r.headers["x-appliance-notice"] == NOTICE
        assert r.read().decode().endswith("data: [DONE]\n\n")
    plain = {**body, "tools": None}
    r = httpx.post(f"{url}/v1/chat/completions", json=plain, headers=headers, timeout=60)
    assert r.status_code == 200 and "x-appliance-notice" not in r.headers


def test_the_gateway_relays_no_notice_from_an_upstream(
    server: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The same server as an upstream: its x-appliance-notice is not ours to pass on (an
    upstream is a third party), the answer is."""
    from appliance.store.inference_store import InferenceStore
    from tests.integration.gateway_harness import start_gateway, stop

    state, port = tmp_path_factory.mktemp("gateway-up"), free_port()
    settings = {
        "backend_url": f"http://127.0.0.1:{free_port()}",  # no local backend
        "served_model_name": "local-model",
        "upstream": {"base_url": f"{server}/v1", "models": [MODEL]},
    }
    proc = start_gateway(state, port, settings)
    try:
        with InferenceStore(state) as store:
            secret = store.create_key("upstream-test", "client")[1]
        body = {"model": MODEL, "messages": CHAT, "max_tokens": 2, "tools": TOOLS}
        r = httpx.post(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            json=body,
            headers={"authorization": f"Bearer {secret}"},
            timeout=60,
        )
        assert r.status_code == 200 and r.headers["x-appliance-route"] == "upstream"
        assert "x-appliance-notice" not in r.headers
    finally:
        stop(proc)
