"""The gateway app in-process (no backend running): auth, validation, routing, budgets before
forwarding, error shapes, health, metrics, settings. Forwarding is covered by the integration tests
against a real stand-in vLLM process."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import ValidationError
from starlette.testclient import TestClient

from appliance.store.inference_store import InferenceStore
from inference.gateway import GatewaySettings, create_app
from inference.gateway.routing import Router
from inference.ports import Budget, ControlPlaneHooks, KeyRecord
from tests.helpers import free_port


@pytest.fixture
def store(tmp_path: Path) -> Iterator[InferenceStore]:
    with InferenceStore(tmp_path) as s:
        yield s


def make_client(store: InferenceStore, hooks: ControlPlaneHooks | None = None, **settings: Any):
    base = {"backend_url": f"http://127.0.0.1:{free_port()}", "aliases": {"smol": "nemotron"}}
    app = create_app(GatewaySettings(**{**base, **settings}), store, store, store, store, hooks)
    return TestClient(app, raise_server_exceptions=False)


@pytest.fixture
def client(store: InferenceStore) -> Iterator[TestClient]:
    with make_client(store) as c:
        yield c


@pytest.fixture
def secret(store: InferenceStore) -> str:
    return store.create_key("tester", "client")[1]


def auth(secret: str) -> dict[str, str]:
    return {"authorization": f"Bearer {secret}"}


def scrape(client: TestClient, store: InferenceStore) -> str:
    """GET /metrics with a key that has the `metrics` scope."""
    _, secret = store.create_key(f"scraper-{len(store.list_keys())}", "client", scopes=["metrics"])
    resp = client.get("/metrics", headers=auth(secret))
    assert resp.status_code == 200, resp.text
    return resp.text


CHAT = {"model": "nemotron", "messages": [{"role": "user", "content": "hi"}]}


def assert_openai_error(resp: Any, status: int, code: str | None = None) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if code is not None:
        assert error["code"] == code
    return error


@pytest.mark.parametrize(
    "header",
    [None, "Bearer", "Bearer ", "Basic abc", "Bearer sk-app-nope", "sk-app-raw", "Bearer  x y"],
)
def test_v1_needs_a_valid_key(client: TestClient, header: str | None) -> None:
    headers = {"authorization": header} if header is not None else {}
    for method, path in [("GET", "/v1/models"), ("POST", "/v1/chat/completions")]:
        resp = client.request(method, path, headers=headers, json=CHAT)
        assert_openai_error(resp, 401, "invalid_api_key")


def test_revoked_key_is_refused(client: TestClient, store: InferenceStore, secret: str) -> None:
    assert client.get("/v1/models", headers=auth(secret)).status_code == 200
    store.revoke_key("tester")
    assert_openai_error(client.get("/v1/models", headers=auth(secret)), 401)


def test_models_lists_served_name_aliases_and_upstream(store: InferenceStore, secret: str) -> None:
    upstream = {"base_url": "http://127.0.0.1:9/v1", "models": ["big/model"]}
    with make_client(
        store, upstream=upstream, aliases={"smol": "nemotron", "big": "big/model"}
    ) as c:
        data = c.get("/v1/models", headers=auth(secret)).json()["data"]
    assert [(m["id"], m["root"]) for m in data] == [
        ("nemotron", "nemotron"),
        ("big", "big/model"),
        ("smol", "nemotron"),
        ("big/model", "big/model"),
    ]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"{not json", None),
        (b"", None),
        (b"[1, 2]", None),
        (b'{"model": "nemotron", "messages": [], "temperature": NaN}', None),
        (json.dumps({"messages": [{"role": "user", "content": "x"}]}).encode(), "model"),
        (json.dumps({"model": "nemotron"}).encode(), "messages"),
        (json.dumps({**CHAT, "messages": []}).encode(), "messages"),
        (json.dumps({**CHAT, "messages": ["hi"]}).encode(), "messages.0"),
        (json.dumps({**CHAT, "temperature": 5}).encode(), "temperature"),
        (json.dumps({**CHAT, "max_tokens": 0}).encode(), "max_tokens"),
        (json.dumps({**CHAT, "max_tokens": "10"}).encode(), "max_tokens"),
        (json.dumps({**CHAT, "stream": "yes"}).encode(), "stream"),
        (json.dumps({**CHAT, "stream_options": {"include_usage": 1}}).encode(), None),
        (json.dumps({**CHAT, "top_p": 1.5}).encode(), "top_p"),
        (json.dumps({**CHAT, "model": 7}).encode(), "model"),
    ],
)
def test_malformed_bodies_are_400(client: TestClient, secret: str, body: bytes, param) -> None:
    resp = client.post("/v1/chat/completions", headers=auth(secret), content=body)
    error = assert_openai_error(resp, 400)
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param


def test_completions_schema(client: TestClient, secret: str) -> None:
    resp = client.post("/v1/completions", headers=auth(secret), json={"model": "nemotron"})
    assert assert_openai_error(resp, 400)["param"] == "prompt"


def test_unknown_model_is_404(client: TestClient, secret: str) -> None:
    resp = client.post("/v1/chat/completions", headers=auth(secret), json={**CHAT, "model": "x"})
    error = assert_openai_error(resp, 404, "model_not_found")
    assert "`x`" in error["message"] and error["param"] == "model"


def test_backend_down_is_503_with_unknown_fields_accepted(client: TestClient, secret: str) -> None:
    body = {**CHAT, "model": "smol", "tools": [{"type": "function"}], "vendor_knob": {"a": 1}}
    resp = client.post("/v1/chat/completions", headers=auth(secret), json=body)
    assert_openai_error(resp, 503, "backend_unavailable")
    resp = client.post("/v1/chat/completions", headers=auth(secret), json={**body, "stream": True})
    assert_openai_error(resp, 503)


def test_unknown_routes_and_methods_are_openai_shaped(client: TestClient) -> None:
    assert_openai_error(client.get("/v1/nope"), 404)
    assert_openai_error(client.get("/v1/chat/completions"), 405)


def test_daily_budget_refuses_before_forwarding(store: InferenceStore, secret: str) -> None:
    key = store.find_key("tester")
    assert key is not None
    store.set_budget(Budget(key.id, daily_tokens=0))
    with make_client(store) as c:
        resp = c.post("/v1/chat/completions", headers=auth(secret), json=CHAT)
        error = assert_openai_error(resp, 429, "daily_tokens_budget_exceeded")
        assert "daily tokens" in error["message"] and "resets at" in error["message"]
        assert int(resp.headers["retry-after"]) > 0
        c.post("/v1/chat/completions", headers=auth(secret), json=CHAT)
        metrics = scrape(c, store)
    assert f'appliance_gateway_budget_state{{key="{key.id}"}} 2.0' in metrics
    assert [e["event"] for e in store.audit_events("budget.exceeded")] == ["budget.exceeded"]


def test_monthly_cap_hard_stops_once(store: InferenceStore, secret: str) -> None:
    key = store.find_key("tester")
    assert key is not None
    store.set_budget(Budget(key.id, monthly_tokens=0, daily_tokens=0))
    stopped: list[KeyRecord] = []

    async def async_hook(k: KeyRecord) -> None:
        stopped.append(k)

    hooks = ControlPlaneHooks(on_hard_stop=[stopped.append, async_hook])
    for _ in range(2):  # a second gateway run: still once per period
        with make_client(store, hooks) as c:
            for _ in range(3):
                resp = c.post("/v1/chat/completions", headers=auth(secret), json=CHAT)
                assert_openai_error(resp, 429, "monthly_tokens_budget_exceeded")
    assert stopped == [key, key]  # each hook, once
    assert len(store.audit_events("budget.hard_stop")) == 1


def test_health_needs_no_key_metrics_need_the_scope(
    client: TestClient, store: InferenceStore, secret: str
) -> None:
    assert client.get("/health/live").json() == {"status": "live"}
    ready = client.get("/health/ready")
    assert ready.status_code == 503 and ready.json()["status"] == "not ready"
    assert_openai_error(client.get("/metrics"), 401, "invalid_api_key")
    error = assert_openai_error(client.get("/metrics", headers=auth(secret)), 403)
    assert error["code"] == "insufficient_scope" and "--scope metrics" in error["message"]
    assert 'appliance_gateway_backend_up{backend="local"} 0.0' in scrape(client, store)


def test_openapi_documents_the_request_bodies(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    body = spec["paths"]["/v1/chat/completions"]["post"]["requestBody"]
    schema = body["content"]["application/json"]["schema"]
    assert "$defs" not in json.dumps(schema) and "messages" in schema["required"]


def test_usage_is_flushed_at_shutdown_and_errors_are_metered(
    store: InferenceStore, secret: str
) -> None:
    with make_client(store) as c:
        for _ in range(5):
            c.post("/v1/chat/completions", headers=auth(secret), json={**CHAT, "model": "x"})
    rows = store.usage_rows()
    assert [r.status for r in rows] == [404] * 5


def test_settings_validation_and_no_secret_in_dump(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValidationError, match="alias"):
        GatewaySettings(aliases={"a": "missing"})
    with pytest.raises(ValidationError, match="fallback"):
        GatewaySettings(upstream={"base_url": "http://x/v1", "fallback": True})
    monkeypatch.setenv("UPSTREAM_KEY", "nvapi-secret")
    s = GatewaySettings(upstream={"base_url": "http://x/v1", "api_key_env": "UPSTREAM_KEY"})
    assert s.upstream is not None and s.upstream.api_key() == "nvapi-secret"
    assert "nvapi-secret" not in s.model_dump_json()
    assert s.budget_warn_ratio == 0.8


def test_router_fallback_only_when_allowed() -> None:
    up = {"base_url": "http://x/v1", "models": ["remote"]}
    router = Router(GatewaySettings(upstream=up))
    local = router.resolve("nemotron")
    assert local is not None and router.fallback(local) is None
    router = Router(GatewaySettings(upstream={**up, "fallback": True}))
    local = router.resolve("nemotron")
    assert local is not None
    fallback = router.fallback(local)
    assert fallback is not None and (fallback.target, fallback.model) == ("upstream", "remote")
    assert router.resolve("remote") is not None and router.resolve("nope") is None


# -- per-key model allowlists ----------------------------------------------------------------

UPSTREAM = {"base_url": "http://127.0.0.1:9/v1", "models": ["big/model"]}
ALIASES = {"smol": "nemotron", "big": "big/model"}


def reply(request: httpx.Request) -> httpx.Response:
    """A stand-in backend: answers every chat request with the model it was sent."""
    sent = json.loads(request.content)["model"]
    usage = {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3}
    return httpx.Response(200, json={"object": "chat.completion", "model": sent, "usage": usage})


@contextmanager
def backed_client(store: InferenceStore, sent: list[str]) -> Iterator[TestClient]:
    """The gateway with an upstream and aliases, its backends answered in-process."""

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(json.loads(request.content)["model"])
        return reply(request)

    with make_client(store, upstream=UPSTREAM, aliases=ALIASES) as c:
        gw = c.app.state.gateway  # type: ignore[attr-defined]
        gw.forward.client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
        yield c


def chat(c: TestClient, secret: str, model: str) -> Any:
    return c.post("/v1/chat/completions", headers=auth(secret), json={**CHAT, "model": model})


def test_allowed_models_pass_under_any_name_of_the_same_model(store: InferenceStore) -> None:
    _, secret = store.create_key("agent", "sandbox", ["smol"])
    sent: list[str] = []
    with backed_client(store, sent) as c:
        for model in ("smol", "nemotron"):  # the alias and the model it names: one model
            resp = chat(c, secret, model)
            assert resp.status_code == 200, resp.text
    assert sent == ["nemotron", "nemotron"]
    assert store.audit_events("model.deny") == []


@pytest.mark.parametrize(
    ("model", "served"),
    [("big/model", "big/model"), ("big", "big/model"), ("gpt-9", None)],
)
def test_a_model_not_allowed_is_403_audited_and_metered(
    store: InferenceStore, model: str, served: str | None
) -> None:
    key, secret = store.create_key("agent", "sandbox", ["smol"])
    sent: list[str] = []
    with backed_client(store, sent) as c:
        resp = chat(c, secret, model)
        error = assert_openai_error(resp, 403, "model_not_allowed")
        metrics = scrape(c, store)
    assert error["type"] == "permission_error" and error["param"] == "model"
    assert f"`{model}`" in error["message"] and "not allowed" in error["message"]
    assert sent == []  # refused before any backend saw it
    # An unknown name gets the same 403 as a known one: no probing for what exists.
    [event] = store.audit_events("model.deny")
    assert (event["key_id"], event["key_name"]) == (key.id, "agent")
    assert (event["model"], event["served"]) == (model, served)
    [row] = store.usage_rows(key.id)
    assert (row.status, row.model, row.prompt_tokens) == (403, served or "-", 0)
    refused = 'appliance_gateway_errors_total{route="/v1/chat/completions",type="permission_error"}'
    assert refused in metrics


def test_an_alias_cannot_smuggle_in_another_model(store: InferenceStore) -> None:
    """Allowed `nemotron` does not open `big`, an alias that leads upstream; and a key given
    only the upstream model through its alias cannot reach the local one."""
    _, local_only = store.create_key("local-only", "sandbox", ["nemotron"])
    _, upstream_only = store.create_key("upstream-only", "sandbox", ["big"])
    sent: list[str] = []
    with backed_client(store, sent) as c:
        assert_openai_error(chat(c, local_only, "big"), 403, "model_not_allowed")
        assert_openai_error(chat(c, local_only, "big/model"), 403, "model_not_allowed")
        assert_openai_error(chat(c, upstream_only, "smol"), 403, "model_not_allowed")
        assert chat(c, upstream_only, "big/model").status_code == 200
    assert sent == ["big/model"]


def test_models_lists_only_what_the_key_may_use(store: InferenceStore) -> None:
    _, local = store.create_key("local", "sandbox", ["smol"])
    _, upstream = store.create_key("upstream", "sandbox", ["big"])
    _, nothing = store.create_key("nothing", "client", ["not-served"])
    with backed_client(store, []) as c:

        def ids(secret: str) -> list[str]:
            return [m["id"] for m in c.get("/v1/models", headers=auth(secret)).json()["data"]]

        assert ids(local) == ["nemotron", "smol"]
        assert ids(upstream) == ["big", "big/model"]
        assert ids(nothing) == []


def test_an_unrestricted_key_is_unchanged(store: InferenceStore, secret: str) -> None:
    sent: list[str] = []
    with backed_client(store, sent) as c:
        data = c.get("/v1/models", headers=auth(secret)).json()["data"]
        assert [m["id"] for m in data] == ["nemotron", "big", "smol", "big/model"]
        for model in ("nemotron", "smol", "big", "big/model"):
            assert chat(c, secret, model).status_code == 200
        assert_openai_error(chat(c, secret, "gpt-9"), 404, "model_not_found")
    assert sent == ["nemotron", "nemotron", "big/model", "big/model"]
    assert store.audit_events("model.deny") == []


def test_a_ledger_that_cannot_admit_fails_closed_with_503(
    store: InferenceStore, secret: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def locked(*_args: Any, **_kw: Any) -> None:
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(store, "reserve", locked)
    with make_client(store) as c:
        resp = c.post("/v1/chat/completions", headers=auth(secret), json=CHAT)
    assert_openai_error(resp, 503, "ledger_unavailable")


def test_a_prompt_past_the_context_is_refused_without_a_backend(
    store: InferenceStore, secret: str
) -> None:
    """max_model_len from the settings (else from the backend's /v1/models): a prompt whose
    lower bound (characters / 256) passes it is a 400 before forwarding (the backend here is a
    closed port: forwarding would be 503), and it is ledgered as refused."""
    huge = {**CHAT, "messages": [{"role": "user", "content": "x" * 300_000}]}
    with make_client(store, max_model_len=1024) as c:
        resp = c.post("/v1/chat/completions", headers=auth(secret), json=huge)
        error = assert_openai_error(resp, 400, "context_length_exceeded")
        assert error["param"] == "messages" and "1024" in error["message"]
        too_many = {**CHAT, "max_tokens": 1024}  # 1 prompt token at least + 1024
        assert_openai_error(
            c.post("/v1/chat/completions", headers=auth(secret), json=too_many),
            400,
            "context_length_exceeded",
        )
    assert [r.state for r in store.usage_rows()] == ["refused", "refused"]


def test_an_unexpected_error_is_a_fixed_500_with_a_request_id_and_the_detail_only_in_the_log(
    store: InferenceStore, secret: str, caplog: pytest.LogCaptureFixture
) -> None:
    class Broken(InferenceStore):
        def authenticate(self, secret: str) -> KeyRecord | None:
            raise RuntimeError("disk /srv/secret-path exploded")

    broken = Broken(store.path.parent)
    app = create_app(
        GatewaySettings(backend_url=f"http://127.0.0.1:{free_port()}"),
        broken, store, store, store,
    )  # fmt: skip
    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.post("/v1/chat/completions", json={"model": "nemotron"}, headers=auth(secret))
    assert r.status_code == 500
    error = r.json()["error"]
    assert error["type"] == "server_error"
    assert "secret-path" not in r.text and "RuntimeError" not in r.text
    request_id = r.headers["x-appliance-request-id"]
    assert request_id in error["message"]
    assert "disk /srv/secret-path exploded" in caplog.text and request_id in caplog.text
