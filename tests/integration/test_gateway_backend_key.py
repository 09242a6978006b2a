"""vLLM on its loopback port requires the backend key the supervisor makes per start, so a local
user cannot skip the gateway's keys, budgets and metering; the gateway (a real process) sends it
from its environment, never argv; /metrics stays open for `appliance status`."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import httpx
import pytest

from appliance.config import ApplianceConfig
from appliance.services import supervisor as sv
from appliance.store.inference_store import InferenceStore
from hardware.planner import plan_serving
from hardware.snapshot import HostSnapshot
from inference.gateway.settings import BACKEND_KEY_ENV
from tests.helpers import free_port
from tests.integration.gateway_harness import running, start_fake_vllm, start_gateway

pytestmark = pytest.mark.integration

HOSTS_DIR = Path(__file__).resolve().parents[1] / "fixtures" / "hosts"
CHAT = {"model": "nemotron", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def test_the_backend_refuses_strangers_and_the_gateway_sends_the_key(tmp_path: Path) -> None:
    key = secrets.token_urlsafe(32)
    backend = free_port()
    store = InferenceStore(tmp_path)
    _, client_secret = store.create_key("edge", "client")
    settings: dict[str, Any] = {"backend_url": f"http://127.0.0.1:{backend}"}
    with running(start_fake_vllm(backend, env={"VLLM_API_KEY": key})):
        direct = httpx.post(f"http://127.0.0.1:{backend}/v1/chat/completions", json=CHAT)
        assert direct.status_code == 401  # a local user without the key
        assert httpx.get(f"http://127.0.0.1:{backend}/metrics").status_code == 200
        auth = {"authorization": f"Bearer {client_secret}"}
        keyed, bare = free_port(), free_port()
        with running(start_gateway(tmp_path, keyed, settings, env={BACKEND_KEY_ENV: key})):
            answer = httpx.post(
                f"http://127.0.0.1:{keyed}/v1/chat/completions", json=CHAT, headers=auth, timeout=30
            )
            assert answer.status_code == 200, answer.text
        with running(start_gateway(tmp_path, bare, settings, env={BACKEND_KEY_ENV: ""})):
            refused = httpx.post(
                f"http://127.0.0.1:{bare}/v1/chat/completions", json=CHAT, headers=auth, timeout=30
            )
            assert refused.status_code >= 400  # no key: the backend refuses the gateway too


def test_the_supervisor_hands_the_key_by_environment_only(tmp_path: Path) -> None:
    config = ApplianceConfig(state_dir=tmp_path, inference={"backend": "vllm"})  # type: ignore[arg-type]
    host = HostSnapshot.model_validate_json((HOSTS_DIR / "rtx_4090_24gb.json").read_text())
    key = secrets.token_urlsafe(32)
    vllm = sv.backend_process(config, plan_serving(host, None), api_key=key)
    gateway = sv.gateway_process(config, key)
    assert vllm.env["VLLM_API_KEY"] == key and vllm.auth_headers() == {
        "Authorization": f"Bearer {key}"
    }
    assert gateway.env == {BACKEND_KEY_ENV: key}
    for proc in (vllm, gateway):
        assert key not in " ".join(proc.spawn_argv()) and key not in proc.command_line()
    # the embedded server has no API keys: nothing to hand it
    embedded = sv.backend_process(config, plan_serving(host.model_copy(update={"gpus": []}), None))
    assert "VLLM_API_KEY" not in embedded.env
