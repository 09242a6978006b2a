"""schemathesis against the gateway's own OpenAPI document: a real gateway process in front of
the stand-in vLLM process, valid and invalid requests generated from the schema for every
operation. No answer may be a 5xx, every answer must be one the document declares (status,
content type, schema), and every error must be OpenAI's error object.

Bounded for the CI budget: a fixed number of examples per operation, derandomized in CI.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from appliance.store.inference_store import InferenceStore
from inference.gateway.errors import ERROR_TYPES
from tests.helpers import free_port
from tests.integration.gateway_harness import running, start_fake_vllm, start_gateway

pytestmark = pytest.mark.integration

EXAMPLES = 200  # per mode, spread over the document's operations
MODELS = ["nemotron", "smol"]  # the served model and an alias


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    tmp: Path = tmp_path_factory.mktemp("schema")
    bport, gport = free_port(), free_port()
    store = InferenceStore(tmp)
    _, secret = store.create_key("schemathesis", "client", scopes=("metrics",))
    backend = start_fake_vllm(bport, args=["--max-model-len", "4096"])
    with running(backend):
        settings_ = {"backend_url": f"http://127.0.0.1:{bport}", "aliases": {"smol": "nemotron"}}
        with running(start_gateway(tmp, gport, settings_)):
            yield f"http://127.0.0.1:{gport}", secret


@schemathesis.check
def openai_error_shape(ctx: Any, response: Any, case: Any) -> bool | None:
    """Every 4xx/5xx is {"error": {message, type, param, code}} with one of OpenAI's types."""
    if response.status_code < 400:
        return None
    error = json.loads(response.content)["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["type"] in ERROR_TYPES, error
    assert isinstance(error["message"], str) and error["message"], error
    return True


def _fitting(pair: tuple[Any, str | None]) -> Any:
    """A valid case steered to what the document cannot say: a model that exists (mostly), a
    completion that fits the context (a valid max_tokens of millions is a correct 400), and a
    seed a float comparison cannot misjudge."""
    case, model = pair
    if isinstance(case.body, dict):
        if model is not None:
            case.body["model"] = model
        for field in ("max_tokens", "max_completion_tokens", "min_tokens"):
            value = case.body.get(field)
            if isinstance(value, int | float) and value > 16:  # 5e6 is a JSON integer too
                case.body[field] = 1 + int(value) % 16
        # The document's int64 bound is exact, but schemathesis judges "valid" with floats: a seed
        # just past 2**63 - 1 rounds onto it and is sent as valid data (the gateway rightly 400s).
        seed = case.body.get("seed")
        if isinstance(seed, int) and abs(seed) > 2**53:
            case.body["seed"] = seed % 2**53
    return case


# schemathesis' own pytest plugin (`from_fixture`/`parametrize`) breaks on pytest 9, so the
# cases come from its Hypothesis strategies: every operation of the document, valid data
# (positive) and data the document forbids (negative).
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_gateway_answers_as_documented(gateway: tuple[str, str], mode: GenerationMode) -> None:
    url, secret = gateway
    api = schemathesis.openapi.from_url(f"{url}/openapi.json")
    operations = {f"{op.ok().method.upper()} {op.ok().path}" for op in api.get_all_operations()}
    assert {"POST /v1/chat/completions", "POST /v1/completions", "GET /v1/models"} <= operations

    cases = api.as_strategy(mode)
    if mode is GenerationMode.POSITIVE:  # mostly a model that exists, so requests go through
        cases = st.tuples(cases, st.sampled_from([*MODELS, None])).map(_fitting)

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=os.environ.get("CI") == "true",
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    @given(case=cases)
    def check(case: Any) -> None:
        event(f"{case.method} {case.path}")
        response = case.call_and_validate(
            headers={"authorization": f"Bearer {secret}"},
            additional_checks=[openai_error_shape],
            timeout=30,
        )
        event(f"status {response.status_code}")
        assert response.status_code < 500, response.text[:300]

    check()
