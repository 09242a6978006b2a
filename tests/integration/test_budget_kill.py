"""`appliance serve gateway` as a real process: a sandbox key's monthly hard stop reaches the kill
switch (audited `kill` with the budget reason), through the control plane when one runs and
directly when none does (fail closed); a client key's hard stop does not."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest

from appliance.store import open_store
from appliance.store.inference_store import InferenceStore
from appliance.store.sandbox_store import SandboxStore
from inference.ports import Budget, OwnerKind
from tests.helpers import free_port
from tests.integration.gateway_harness import start_fake_vllm, stop, wait_http

pytestmark = pytest.mark.integration

APPLIANCE = str(Path(sys.executable).parent / "appliance")
HI = [{"role": "user", "content": "hi there"}]  # 2 prompt tokens for the stand-in


@dataclass
class Env:
    url: str
    store: InferenceStore

    def client(self, name: str, owner: OwnerKind) -> openai.OpenAI:
        _record, secret = self.key(name, owner)
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=secret, max_retries=0)

    def key(self, name: str, owner: OwnerKind) -> tuple[str, str]:
        record, secret = self.store.create_key(name, owner)
        # Reservations hold prompt bound (body + 256) + max_tokens: a request of ours reserves
        # ~350 tokens at least, an ordinary size for this month (< 20 % of it).
        self.store.set_budget(Budget(record.id, monthly_tokens=2000))
        return record.id, secret

    def kills(self, timeout: float = 0.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        while not (events := self.store.audit_events("kill")) and time.monotonic() < deadline:
            time.sleep(0.05)
        return events


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    backend_port, gateway_port = free_port(), free_port()
    backend = start_fake_vllm(backend_port)
    environ = {
        **os.environ,  # conftest's isolated config layers and APPLIANCE_STATE_DIR
        "APPLIANCE_GATEWAY__PORT": str(gateway_port),
        "APPLIANCE_INFERENCE__BACKEND_LISTEN__PORT": str(backend_port),
    }
    gateway = subprocess.Popen([APPLIANCE, "serve", "gateway"], env=environ)
    store = InferenceStore(Path(os.environ["APPLIANCE_STATE_DIR"]))
    try:
        wait_http(f"http://127.0.0.1:{gateway_port}/health/live", gateway)
        yield Env(f"http://127.0.0.1:{gateway_port}", store)
    finally:
        stop(gateway)
        stop(backend)
        store.close()


def exhaust(client: openai.OpenAI) -> None:
    """Spend the 2,000-token month (max_tokens capped to what is left, near the end) until
    not even a short request fits: the monthly cap is reached."""
    deadline = time.monotonic() + 20
    refusals = 0
    while time.monotonic() < deadline:
        try:
            client.chat.completions.create(model="nemotron", messages=HI, max_tokens=400)
        except openai.RateLimitError:
            refusals += 1
            if refusals == 2:  # the last settlement has landed by now: the spend, not a hold
                return
        time.sleep(0.2)  # let the settlement land: the reservation counts until then
    pytest.fail("the monthly token budget never refused")


def test_sandbox_key_hard_stop_runs_the_kill_switch(env: Env) -> None:
    # No control plane runs here: the hook fails closed, stopping the sandbox itself.
    exhaust(env.client("sandbox-demo", "sandbox"))
    (kill,) = env.kills(timeout=5)
    assert "monthly budget hard stop for key sandbox-demo" in kill["reason"]
    assert kill["hold"] is False
    assert kill["sandboxes"] == []  # no such sandbox here: nothing stopped, the attempt audited
    assert [e["key_name"] for e in env.store.audit_events("budget.hard_stop")] == ["sandbox-demo"]
    assert env.store.audit_events("control.kill") == []  # nobody asked: no control plane


def test_sandbox_key_hard_stop_asks_the_control_plane(env: Env, control_plane: object) -> None:
    exhaust(env.client("sandbox-demo", "sandbox"))
    (kill,) = env.kills(timeout=10)
    assert "monthly budget hard stop for key sandbox-demo" in kill["reason"]
    assert kill["sandboxes"] == [] and kill["hold"] is False
    (asked,) = env.store.audit_events("control.kill")  # the control plane did it, for the gateway
    assert asked["sandboxes"] == ["demo"] and asked["hold"] is False
    assert asked["actor_kind"] == "unix" and asked["actor"] == f"uid:{os.geteuid()}"


def test_client_key_hard_stop_is_only_audited(env: Env) -> None:
    exhaust(env.client("sandbox-lookalike", "client"))
    deadline = time.monotonic() + 5
    while not env.store.audit_events("budget.hard_stop") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [e["key_name"] for e in env.store.audit_events("budget.hard_stop")] == [
        "sandbox-lookalike"
    ]
    assert env.kills(timeout=0.5) == []


def _podman_skip_reason() -> str | None:
    if shutil.which("podman") is None:
        return "podman not installed (scripts/setup.sh installs it)"
    try:
        pwd.getpwnam("appliance")
    except KeyError:
        return "service user 'appliance' missing (run scripts/setup-service-user.sh as root)"
    if os.geteuid() != 0:
        return "needs root: the kill switch starts podman as the service user"
    return None


@pytest.fixture
def podman_service() -> Iterator[None]:
    """The service user's Podman API; stopped afterwards only if this test started it."""
    if (reason := _podman_skip_reason()) is not None:
        pytest.skip(reason)
    from sandbox.lifecycle.podman_service import PodmanService

    was_running = PodmanService().is_running()
    yield
    if not was_running:
        PodmanService().stop()


@pytest.mark.slow
def test_hard_stop_stops_a_recorded_sandbox(env: Env, podman_service: None) -> None:
    """A store record whose container is gone: the real kill path (Podman up, container looked
    up, proxy stopped) runs and marks the sandbox stopped."""
    key_id, secret = env.key("sandbox-demo", "sandbox")
    state_dir = Path(os.environ["APPLIANCE_STATE_DIR"])
    with open_store(state_dir) as store:
        SandboxStore(store).upsert(
            "demo", image="img", command=["sleep", "infinity"], state="running", key_id=key_id
        )
    exhaust(openai.OpenAI(base_url=f"{env.url}/v1", api_key=secret, max_retries=0))
    (kill,) = env.kills(timeout=60)  # may include starting the Podman service
    assert kill["sandboxes"] == ["demo"] and "monthly budget" in kill["reason"]
    with open_store(state_dir) as store:
        assert SandboxStore(store).get("demo").state == "stopped"
