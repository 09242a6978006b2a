"""`scripts/appliance-up.sh --container` for real: the embedded model served from the CPU appliance
image under the service user's rootless Podman, and everything else as on the venv path.

The README's command itself runs (setup.sh finds the suite's install and installs nothing; the
demo agent is skipped with APPLIANCE_NO_AGENT=1: its OpenClaw layer is the openclaw group's cost),
with the image of this source tree (the session's `cpu_image`), a state dir and ports of its own.
Then, against the backend in the container: `appliance status --json` names the container and
its image and says ready; a key made with the CLI gets real SmolLM2 tokens through the official
openai client at the gateway, and the ledger counts them; a `kind: command` agent on the base
image asks inference.local for a few tokens through its sandbox's proxy, and its key is charged;
`appliance down` leaves no container and no process.
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml

from inference.backends.container import cache_volume_name, container_name
from sandbox.images.base import recipe_digest
from tests.conftest import REPO
from tests.e2e.up_env import environment
from tests.helpers import SERVICE_USER
from tests.sandbox_fixtures import sandbox_skip_reason

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.xdist_group("cpu-image")]

APPLIANCE = str(Path(sys.executable).parent / "appliance")
SCRIPT = REPO / "scripts" / "appliance-up.sh"
AGENT = f"ctr-{os.getpid()}"  # one Podman serves both xdist workers: a name of its own
MAX_TOKENS = 6
# The agent's turn (python3-minimal in the base image): one chat completion from inference.local
# through the sandbox's egress proxy (no key: the proxy injects the agent's), printed as JSON.
TURN = """
import json, os, urllib.request
proxy = urllib.request.ProxyHandler({"http": "http://127.0.0.1:3128"})
body = {"model": "default", "max_tokens": MAX_TOKENS, "temperature": 0,
        "messages": [{"role": "user", "content": os.environ["AGENT_MESSAGE"]}]}
req = urllib.request.Request("http://inference.local/v1/chat/completions",
                             data=json.dumps(body).encode(),
                             headers={"content-type": "application/json"})
with urllib.request.build_opener(proxy).open(req, timeout=120) as answer:
    reply = json.load(answer)
print(json.dumps({"content": reply["choices"][0]["message"]["content"], "usage": reply["usage"],
                  "model": reply["model"]}))
""".replace("MAX_TOKENS", str(MAX_TOKENS))


def blueprint_yaml() -> str:
    return yaml.safe_dump(
        {
            "name": "e2e-inference",
            "version": "1.0.0",
            "runtime": {
                "kind": "command",
                "command": ["sleep", "infinity"],
                "turn": ["python3", "-c", TURN],
            },
            "image": {"name": "localhost/appliance-base", "digest": recipe_digest()},
            "sandbox": {"base": "default"},
            "budgets": {"daily_tokens": 10000},
        }
    )


@dataclass
class Appliance:
    env: dict[str, str]
    up_output: str
    suite_installed: bool  # the venv had a stamp of this pyproject (scripts/test.sh's setup)

    @property
    def state_dir(self) -> Path:
        return Path(self.env["APPLIANCE_STATE_DIR"])


def cli(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [APPLIANCE, *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def ok(env: dict[str, str], *args: str, timeout: float = 120) -> str:
    done = cli(env, *args, timeout=timeout)
    assert done.returncode == 0, f"{args}: {done.stdout}\n{done.stderr}"
    return done.stdout


def user_podman(*args: str) -> subprocess.CompletedProcess[str]:
    """podman as the service user, with its rootless environment only."""
    pw = pwd.getpwnam(SERVICE_USER)
    env = [f"HOME={pw.pw_dir}", f"XDG_RUNTIME_DIR=/run/user/{pw.pw_uid}", f"PATH={os.defpath}"]
    return subprocess.run(
        ["runuser", "-u", SERVICE_USER, "--", "env", "-i", *env, "podman", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd="/",
    )


def containers(name: str) -> list[str]:
    done = user_podman("ps", "-a", "--filter", f"name=^{name}$", "--format", "{{.Names}}")
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def alive(pid: int) -> bool:
    """Running, not merely a zombie waiting for a parent (or init) to reap it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def key_spend(env: dict[str, str], key: str) -> dict[str, Any]:
    status = json.loads(ok(env, "status", "--json"))
    [row] = [k for k in status["budgets"]["keys"] if k["key"] == key]
    return row["spend"]


@pytest.fixture(scope="module")
def app(request: pytest.FixtureRequest, cpu_image: dict[str, Any]) -> Iterator[Appliance]:
    if os.geteuid() != 0:
        pytest.skip("the container path runs the service user's Podman, and agents need root")
    if (why := sandbox_skip_reason()) is not None:
        pytest.skip(why)
    root = Path(tempfile.mkdtemp(prefix="ec-"))  # short: unix sockets live under it
    root.chmod(0o755)
    (root / "bp" / "e2e-inference" / "1.0.0").mkdir(parents=True)
    (root / "bp" / "e2e-inference" / "1.0.0" / "blueprint.yaml").write_text(blueprint_yaml())
    env = environment(root, request.config, state="s")
    env.update(
        APPLIANCE_VENV=sys.prefix,  # the venv running these tests: setup.sh finds its stamp
        APPLIANCE_NO_AGENT="1",
        APPLIANCE_INFERENCE__CONTAINER__IMAGE=str(cpu_image["ref"].tag),  # this tree's image
        APPLIANCE_BLUEPRINTS__DIRS=json.dumps([str(root / "bp")]),
    )
    state = root / "s"
    pyproject_hash = hashlib.sha256((REPO / "pyproject.toml").read_bytes()).hexdigest()[:16]
    suite_installed = any(Path(sys.prefix).glob(f".installed-{pyproject_hash}-*"))
    try:
        t0 = time.monotonic()
        done = subprocess.run(
            [str(SCRIPT), "--container"],
            env=env,
            capture_output=True,
            text=True,
            timeout=420,
            cwd="/",
            stdin=subprocess.DEVNULL,
        )
        print(f"\nappliance-up.sh --container: {time.monotonic() - t0:.1f} s", flush=True)
        print(done.stdout[-4000:], flush=True)  # pytest shows it with a failure
        assert done.returncode == 0, done.stdout + done.stderr
        yield Appliance(env, done.stdout, suite_installed)
    finally:
        cli(env, "agent", "rm", AGENT, timeout=120)
        cli(env, "down", timeout=120)
        user_podman("rm", "--force", "--ignore", container_name(state))
        user_podman("volume", "rm", "--force", cache_volume_name(state))
        shutil.rmtree(root, ignore_errors=True)


def test_status_says_the_backend_runs_in_the_container(app: Appliance) -> None:
    out = app.up_output
    if app.suite_installed:  # any extras of this pyproject cover setup.sh's base install
        assert "setup: installing" not in out, out
    assert "appliance image (cpu) [done]" in out, out
    status = json.loads(ok(app.env, "status", "--json"))
    inference = status["inference"]
    name = container_name(app.state_dir)
    image = app.env["APPLIANCE_INFERENCE__CONTAINER__IMAGE"]
    assert inference["state"] == "ready", inference
    assert inference["container"] == {"name": name, "image": image}
    assert inference["plan"]["backend"] == "embedded"
    assert status["gateway"]["state"] == "ready" and status["control"]["state"] == "ready"
    assert containers(name) == [name]  # running, on the service user's Podman
    # The supervisor's backend service is the foreground `podman run` of that image.
    backend = json.loads((app.state_dir / "run" / "services.json").read_text())["backend"]
    argv = Path(f"/proc/{backend['pid']}/cmdline").read_bytes().decode().split("\0")
    assert Path(argv[0]).name == "podman" and "run" in argv and image in argv, argv
    assert not any("inference.embedded" in a for a in argv[: argv.index(image)]), argv
    # The script's own `appliance status` (human) said so too.
    assert name in out, out[-2000:]


def test_a_cli_key_gets_real_tokens_from_the_container(app: Appliance) -> None:
    env = app.env
    created = json.loads(ok(env, "keys", "create", "e2e-ctr", "--json"))
    client = openai.OpenAI(
        base_url=f"http://127.0.0.1:{env['APPLIANCE_GATEWAY__PORT']}/v1",
        api_key=created["secret"],
        max_retries=0,
    )
    assert "nemotron" in [m.id for m in client.models.list().data]
    reply = client.chat.completions.create(
        model="nemotron",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=8,
        temperature=0,
    )
    assert reply.choices[0].message.content and reply.choices[0].message.content.strip()
    assert reply.usage is not None
    assert reply.usage.prompt_tokens > 5 and 0 < reply.usage.completion_tokens <= 8
    status = json.loads(ok(env, "status", "--json"))
    # The backend's counters are the container's: they saw the warm-up and this request.
    assert status["inference"]["metrics"]["generation_tokens_total"] >= (
        reply.usage.completion_tokens
    )
    assert key_spend(env, "e2e-ctr")["day_tokens"] == reply.usage.total_tokens


def test_an_agent_turn_through_inference_local(app: Appliance) -> None:
    env = app.env
    t0 = time.monotonic()
    ok(env, "agent", "create", AGENT, "--blueprint", "e2e-inference", timeout=300)
    created_s = time.monotonic() - t0
    t0 = time.monotonic()
    out = ok(env, "agent", "run", AGENT, "Name a colour.", timeout=300)
    print(f"\nagent create {created_s:.1f} s, turn {time.monotonic() - t0:.1f} s", flush=True)
    reply = json.loads(out.strip().splitlines()[-1])
    assert reply["model"] == "nemotron"  # "default" resolved by the gateway's alias
    assert reply["content"].strip(), reply
    usage = reply["usage"]
    assert usage["prompt_tokens"] > 5 and 0 < usage["completion_tokens"] <= MAX_TOKENS
    # The proxy injected the agent's key: its ledger row counts exactly this turn's request.
    assert key_spend(env, f"sandbox-{AGENT}")["day_tokens"] == usage["total_tokens"]


def test_down_leaves_no_container_and_no_process(app: Appliance) -> None:
    """Runs last: it takes the appliance down."""
    env = app.env
    services = json.loads((app.state_dir / "run" / "services.json").read_text())
    pids = [services["supervisor_pid"]]
    pids += [services[name]["pid"] for name in ("control", "backend", "gateway")]
    ok(env, "agent", "rm", AGENT, timeout=120)
    t0 = time.monotonic()
    ok(env, "down", timeout=120)
    print(f"\nappliance down: {time.monotonic() - t0:.1f} s", flush=True)
    assert not [pid for pid in pids if alive(pid)]
    assert containers(container_name(app.state_dir)) == []
    status = json.loads(ok(env, "status", "--json"))
    assert status["inference"]["state"] == "down" and status["inference"]["container"] is None
    assert status["gateway"]["state"] == "down" and status["control"]["state"] == "down"
