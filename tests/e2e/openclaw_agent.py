"""What tests/e2e/test_agent_openclaw.py drives and reads: the appliance through its CLI, the
agent's blueprint file, the supervisor's report on the runtime, the gateway's readiness through
the agent socket, the model's prefix-cache counter, and the `appliance up` services' pids."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import yaml

from blueprints.catalog import Catalog
from tests.sandbox_fixtures import service_home

APPLIANCE = str(Path(sys.executable).parent / "appliance")
AGENT = f"demo-{os.getpid()}"  # one Podman serves both xdist workers: a name of its own
SESSION = "e2e"
FAIL_CLOSED_AFTER = 20
MAX_OUTPUT_TOKENS = 32
SCHEDULE_PROMPT = "Reply with the word tick"
# Run inside the sandbox by `sandbox exec`: one request through the agent's own proxy.
PROBE = """
import json, sys, urllib.request, urllib.error
url, body = sys.argv[1], (sys.argv[2].encode() if len(sys.argv) > 2 else None)
req = urllib.request.Request(url, data=body, headers={"content-type": "application/json"})
try:
    with urllib.request.urlopen(req, timeout=int(sys.argv[3]) if len(sys.argv) > 3 else 120) as r:
        print(json.dumps({"status": r.status, "body": r.read().decode()[:500]}))
except urllib.error.HTTPError as e:
    print(json.dumps({"status": e.code, "body": e.read().decode()[:500]}))
except Exception as e:
    print(json.dumps({"status": None, "body": repr(e)}))
"""
# Run inside the sandbox by `sandbox exec` (the agent's Landlock ruleset): what the agent can do
# to reach its own gateway or change its config. Each attempt prints its errno name, "closed"
# (connected, but nothing answered) or "answered"/"written".
INSIDE = """
import errno, json, socket, sys
out = {}
def attempt(name, fn):
    try:
        out[name] = fn()
    except OSError as e:
        out[name] = errno.errorcode.get(e.errno, str(e))
def tcp():
    s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5)
    s.close()
    return "connected"
def unix():
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect("/run/appliance/sock/agent.sock")
    s.sendall(b"GET /readyz HTTP/1.0\\r\\n\\r\\n")
    data = s.recv(100)
    s.close()
    return "answered" if data else "closed"
def write():
    with open(sys.argv[2], "a") as f:
        f.write(" ")
    return "written"
attempt("gateway_port", tcp)
attempt("agent_socket", unix)
attempt("config_write", write)
print(json.dumps(out))
"""
T = TypeVar("T")


def blueprint_text() -> str:
    """The catalog's openclaw@1.1.0 under a name of its own (so it is a client's blueprint), with
    a one-minute schedule, a short fail-closed time and short replies (decoding is most of a
    turn on two cores; the test checks where a reply came from, not what it says)."""
    [entry] = [e for e in Catalog().entries() if (e.name, e.version) == ("openclaw", "1.1.0")]
    data = yaml.safe_load(entry.path.read_text())
    data.update(
        name="e2e-openclaw",
        description="openclaw@1.1.0, scheduled every minute, failing closed after 20 s",
        inference={**data["inference"], "max_output_tokens": MAX_OUTPUT_TOKENS},
        lifecycle={"fail_closed_after": FAIL_CLOSED_AFTER},
        schedule=[{"every": "1m", "prompt": SCHEDULE_PROMPT, "session": "sched"}],
    )
    return yaml.safe_dump(data, sort_keys=False)


# -- the appliance, through its CLI ---------------------------------------------------------


@dataclass
class Appliance:
    env: dict[str, str]
    created_at: float  # wall clock, when `agent create` returned

    @property
    def state_dir(self) -> Path:
        return Path(self.env["APPLIANCE_STATE_DIR"])


def cli(env: dict[str, str], *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [APPLIANCE, *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def ok(env: dict[str, str], *args: str, timeout: float = 600) -> str:
    done = cli(env, *args, timeout=timeout)
    assert done.returncode == 0, f"{args}: {done.stdout}\n{done.stderr}"
    return done.stdout


def up(env: dict[str, str]) -> None:
    t0 = time.monotonic()
    ok(env, "up", "--timeout", "300", timeout=330)
    print(f"\nappliance up: {time.monotonic() - t0:.0f} s", flush=True)


# -- what the test reads ---------------------------------------------------------------------


def until(what: str, timeout: float, probe: Callable[[], T | None], every: float = 0.5) -> T:
    """`probe()`'s first truthy value within `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        if value := probe():
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:.0f} s: {what}")
        time.sleep(every)


def sandbox_root() -> Path:
    home = service_home()
    assert home is not None  # sandbox_skip_reason() checked the service user
    return home / "sandboxes" / AGENT


def runtime() -> dict[str, Any]:
    """The supervisor's report on the runtime (no command or API shows it yet: the file the
    control plane reads, <service home>/sandboxes/NAME/report/enforcement.json, written
    atomically by PID 1)."""
    path = sandbox_root() / "report" / "enforcement.json"
    try:
        return json.loads(path.read_text()).get("runtime") or {}
    except FileNotFoundError:
        return {}


def runtime_in(*states: str, timeout: float) -> dict[str, Any]:
    seen: list[dict[str, Any]] = [{}]

    def probe() -> dict[str, Any] | None:
        seen[0] = section = runtime()
        return section if section.get("state") in states else None

    try:
        return until(f"runtime state in {states}", timeout, probe)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; the report says {seen[0]}") from None


def gateway_ready() -> bool:
    """OpenClaw's unauthenticated /readyz, asked through the agent socket as the control plane
    reaches it (root on the host)."""
    sock = sandbox_root() / "sock" / "agent.sock"
    try:
        transport = httpx.HTTPTransport(uds=str(sock))
        with httpx.Client(transport=transport, timeout=5) as client:
            return client.get("http://agent/readyz").status_code == 200
    except httpx.HTTPError:
        return False


def turn(env: dict[str, str], message: str, session: str = SESSION) -> tuple[dict, float]:
    t0 = time.monotonic()
    out = ok(env, "agent", "run", AGENT, message, "--session", session, "--json")
    return json.loads(out), time.monotonic() - t0


def cached_tokens(usage: dict[str, Any]) -> int | None:
    """Prompt tokens the model served from its prefix cache, in whichever shape the runtime
    reports usage (OpenClaw's agentMeta, OpenAI Responses, OpenAI chat)."""
    for found in (
        usage.get("cacheRead"),
        (usage.get("input_tokens_details") or {}).get("cached_tokens"),
        (usage.get("prompt_tokens_details") or {}).get("cached_tokens"),
        usage.get("cached_tokens"),
    ):
        if found is not None:
            return int(found)
    return None


def prefix_cache_hits(env: dict[str, str]) -> float:
    """The embedded model's prefix-cache hits so far (vLLM's counter, in tokens)."""
    port = env["APPLIANCE_INFERENCE__BACKEND_LISTEN__PORT"]
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    found = re.search(r"^vllm:prefix_cache_hits_total\{[^}]*\} (\S+)$", text, re.M)
    return float(found[1]) if found else 0.0


def probe(env: dict[str, str], *args: str, timeout: float = 180) -> dict:
    out = ok(env, "sandbox", "exec", AGENT, "--", "python3", "-c", PROBE, *args, timeout=timeout)
    return json.loads(out.strip().splitlines()[-1])


def ledger(env: dict[str, str]) -> dict:
    report = json.loads(ok(env, "status", "--json"))
    [key] = [k for k in report["budgets"]["keys"] if k["key"] == f"sandbox-{AGENT}"]
    return key


def spent(env: dict[str, str], period: str) -> int:
    """The agent key's `day_tokens` or `month_tokens`, at least 2: a period that has just begun
    (a CI run across 00:00 UTC) starts at 0, so one small request is spent first; a budget of
    spent - 1 is then over."""
    if (used := ledger(env)["spend"][period]) >= 2:
        return used
    body = json.dumps(
        {"model": "default", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
    )
    answer = probe(env, "http://inference.local/v1/chat/completions", body)
    assert answer["status"] == 200, answer
    return until(f"{period} metered", 30, lambda: (n := ledger(env)["spend"][period]) >= 2 and n)


def audit(env: dict[str, str], n: int = 400) -> list[dict[str, Any]]:
    return json.loads(ok(env, "audit", "tail", "-n", str(n), "--json"))


def transcript(env: dict[str, str]) -> list[dict[str, Any]]:
    return json.loads(ok(env, "agent", "transcript", AGENT, "--json"))


def schedule(env: dict[str, str]) -> dict[str, Any]:
    [entry] = json.loads(ok(env, "agent", "schedule", AGENT, "--json"))
    return entry


def service_pids(app: Appliance) -> list[int]:
    """The `appliance up` supervisor and the services it runs, as `appliance status` and
    `down` find them (appliance/services/run_state.py)."""
    from appliance.config import load_config
    from appliance.services import supervisor

    config = load_config({"state_dir": str(app.state_dir)})
    running = supervisor.running_supervisor(config)
    assert running is not None, "no supervisor runs"
    services = supervisor.read_services(config)
    assert services.get("supervisor_pid") == running[0], services
    children = [s["pid"] for n, s in services.items() if isinstance(s, dict) and s.get("pid")]
    assert len(children) == 3, services  # control, backend, gateway
    return [running[0], *children]


def gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] in "ZX"
    except (FileNotFoundError, IndexError):
        return True
