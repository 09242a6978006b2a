"""The whole appliance here: `appliance up` serves real SmolLM2 tokens at inference.local.

Real processes throughout: the CLI, the supervisor, the control plane, the embedded model server
and the gateway, driven by the official openai client; then `appliance down` must leave nothing
running.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.e2e.up_env import environment

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

APPLIANCE = str(Path(sys.executable).parent / "appliance")


@pytest.fixture(scope="module")
def appliance_env(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, str]]:
    env = environment(tmp_path_factory.mktemp("appliance"), request.config)
    up = subprocess.run(
        [APPLIANCE, "up", "--timeout", "300"], env=env, capture_output=True, text=True, timeout=330
    )
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        yield env
    finally:
        subprocess.run([APPLIANCE, "down"], env=env, capture_output=True, timeout=90)


def alive(pid: int) -> bool:
    """Running, not merely a zombie waiting for a parent (or init) to reap it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([APPLIANCE, *args], env=env, capture_output=True, text=True, timeout=60)


def test_up_serves_real_tokens_through_the_gateway(appliance_env: dict[str, str]) -> None:
    env = appliance_env
    created = json.loads(cli(env, "keys", "create", "e2e", "--json").stdout)
    client = openai.OpenAI(
        base_url=f"http://127.0.0.1:{env['APPLIANCE_GATEWAY__PORT']}/v1",
        api_key=created["secret"],
        max_retries=0,
    )
    assert "nemotron" in [m.id for m in client.models.list().data]
    reply = client.chat.completions.create(
        model="nemotron",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=12,
        temperature=0,
    )
    assert reply.choices[0].message.content.strip()
    assert reply.usage.prompt_tokens > 5 and 0 < reply.usage.completion_tokens <= 12

    stream = client.chat.completions.create(
        model="nemotron",
        messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=8,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0

    status = json.loads(cli(env, "status", "--json").stdout)
    assert status["inference"]["state"] == "ready"
    assert status["gateway"]["state"] == "ready"
    # The third service: the control plane the `keys create` above went through.
    state_dir = Path(env["APPLIANCE_STATE_DIR"])
    assert status["control"]["state"] == "ready"
    assert status["control"]["socket"] == str(state_dir / "run" / "control.sock")
    created_by = [
        r for r in map(json.loads, (state_dir / "audit" / "audit.jsonl").read_text().splitlines())
        if r["event"] == "control.request" and r["path"] == "/api/v1/keys"
    ]  # fmt: skip
    assert created_by and created_by[0]["status"] == 201 and created_by[0]["actor_kind"] == "unix"
    assert status["inference"]["plan"]["variant"] == "smollm2-135m"
    assert status["inference"]["metrics"]["generation_tokens_total"] >= (
        reply.usage.completion_tokens + chunks[-1].usage.completion_tokens
    )
    (key,) = [k for k in status["budgets"]["keys"] if k["key"] == "e2e"]
    expected = reply.usage.total_tokens + chunks[-1].usage.total_tokens
    assert key["spend"]["day_tokens"] == expected  # the ledger saw both requests


def test_completions_and_errors_through_the_gateway(appliance_env: dict[str, str]) -> None:
    env = appliance_env
    base_url = f"http://127.0.0.1:{env['APPLIANCE_GATEWAY__PORT']}/v1"
    secret = json.loads(cli(env, "keys", "create", "errs", "--json").stdout)["secret"]
    client = openai.OpenAI(base_url=base_url, api_key=secret, max_retries=0)

    done = client.completions.create(model="nemotron", prompt="The sky is", max_tokens=5)
    assert done.choices[0].text and done.usage.completion_tokens <= 5

    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=base_url, api_key="sk-app-wrong", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "x"}]
        )
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="nemotron", messages="not a list")  # type: ignore[arg-type]

    # A daily budget already used up: the next request is refused, naming the budget.
    assert cli(env, "budget", "set", "errs", "--daily-tokens", "1").returncode == 0
    with pytest.raises(openai.RateLimitError, match="daily"):
        client.chat.completions.create(
            model="nemotron", messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )


def test_up_is_idempotent_and_down_stops_everything(appliance_env: dict[str, str]) -> None:
    """Runs last: it takes the appliance down."""
    env = appliance_env
    again = cli(env, "up")
    assert again.returncode == 0 and "already up" in again.stdout
    services = json.loads((Path(env["APPLIANCE_STATE_DIR"]) / "run" / "services.json").read_text())
    pids = [services["supervisor_pid"]]
    pids += [services[name]["pid"] for name in ("control", "backend", "gateway")]
    down = cli(env, "down")
    assert down.returncode == 0, down.stderr
    assert not [pid for pid in pids if alive(pid)]
    status = json.loads(cli(env, "status", "--json").stdout)
    assert status["gateway"]["state"] == "down" and status["control"]["state"] == "down"
    gone = cli(env, "keys", "create", "after-down")
    assert gone.returncode == 7 and "appliance up" in gone.stderr
