"""Blueprint schedules and parking, end to end: a real control plane (`appliance serve control`)
and a `kind: command` agent whose blueprint says `schedule: [{every: 1m, prompt: tick}]`.

- a turn with trigger `schedule`, by the `scheduler`, lands in the transcript within 90 s of
  the agent's creation (and in the audit log, and in `agent schedule`);
- while `kill --all --hold` holds, the next run is skipped with the hold as its reason (beside
  the last run's outcome, which it does not hide), and no turn runs: the refusal is a refused
  `schedule` line in the transcript, as a refused manual turn is;
- a graceful stop of the control plane (SIGTERM, as `appliance down` and systemd send) parks the
  running agent (container stopped, recorded state still `running`), and the next control plane
  brings it back.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import yaml

from appliance.audit import audit_path, records
from sandbox.images.base import recipe_digest
from tests.control_fixtures import control_socket, running_control_plane
from tests.helpers import cli_env
from tests.sandbox_fixtures import ensure_base_image, sandbox_skip_reason

pytestmark = [pytest.mark.integration, pytest.mark.slow]

APPLIANCE = str(Path(sys.executable).parent / "appliance")
TURN = ["sh", "-c", 'printf "%s|%s" "$AGENT_SESSION" "$AGENT_MESSAGE"']
AGENT = "ticker"
FIRST_RUN_WITHIN_S = 90.0
T = TypeVar("T")


def _environment(root: Path) -> dict[str, str]:
    blueprint = {
        "name": "ticker",
        "version": "1.0.0",
        "runtime": {"kind": "command", "command": ["sleep", "infinity"], "turn": TURN},
        "image": {"name": "localhost/appliance-base", "digest": recipe_digest()},
        "sandbox": {"base": "default"},
        "budgets": {"daily_tokens": 1000},
        "schedule": [{"every": "1m", "prompt": "tick"}],
    }
    path = root / "bp" / "ticker" / "1.0.0" / "blueprint.yaml"
    path.parent.mkdir(parents=True)
    path.write_text(yaml.safe_dump(blueprint))
    return cli_env(root / "s", root, APPLIANCE_BLUEPRINTS__DIRS=json.dumps([str(root / "bp")]))


@pytest.fixture
def env() -> Iterator[dict[str, str]]:
    if (why := sandbox_skip_reason()) is not None:
        pytest.skip(why)
    ensure_base_image()
    root = Path(tempfile.mkdtemp(prefix="as-"))  # short: unix socket paths live under it
    root.chmod(0o755)
    env = _environment(root)
    try:
        yield env
    finally:
        # Whatever the test left: the agent removed through a control plane of its own.
        state = root / "s"
        with running_control_plane(env, state), _client(state) as client:
            client.post("/release")
            client.delete(f"/agents/{AGENT}")
        shutil.rmtree(root, ignore_errors=True)


def _client(state: Path) -> httpx.Client:
    return httpx.Client(
        transport=httpx.HTTPTransport(uds=str(control_socket(state))),
        base_url="http://control/api/v1",
        timeout=300,
    )


def _audit(state: Path, event: str) -> list[dict[str, Any]]:
    return [r for r in records(audit_path(state)) if r["event"] == event and AGENT in json.dumps(r)]


def _wait(what: str, timeout: float, probe: Callable[[], T | None], every: float = 1.0) -> T:
    deadline = time.monotonic() + timeout
    while True:
        found = probe()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f} s")
        time.sleep(every)


def _scheduled_turns(client: httpx.Client, refused: bool = False) -> list[dict[str, Any]]:
    """The transcript's schedule turns that ran (`refused`: those refused instead)."""
    turns = client.get(f"/agents/{AGENT}/transcript").json()
    return [
        t for t in turns if t.get("trigger") == "schedule" and bool(t.get("refused")) == refused
    ]


def test_schedule_runs_skips_while_held_and_survives_a_graceful_restart(
    env: dict[str, str],
) -> None:
    state = Path(env["APPLIANCE_STATE_DIR"])
    with running_control_plane(env, state) as plane, _client(state) as client:
        created_at = time.monotonic()
        made = client.post("/agents", json={"name": AGENT, "blueprint": "ticker@1.0.0"})
        assert made.status_code == 201, made.text

        # 1. The first scheduled turn, within 90 s of the create.
        [turn] = _wait("a scheduled turn", FIRST_RUN_WITHIN_S, lambda: _scheduled_turns(client))
        took = time.monotonic() - created_at
        assert took <= FIRST_RUN_WITHIN_S, took
        assert turn["message"] == "tick" and turn["ok"] is True, turn
        assert turn["reply"] == "schedule-0|tick" and turn["actor"] == "scheduler", turn
        [entry] = _wait(
            "the run's outcome",
            30,
            lambda: [e for e in client.get(f"/agents/{AGENT}/schedule").json() if e["runs"]],
        )
        assert entry["every"] == "1m" and entry["session"] == "schedule-0"
        assert entry["last_outcome"] in ("ok", "running"), entry
        assert entry["next_run_at"] - entry["last_run_at"] == pytest.approx(60, abs=3)
        [run] = _audit(state, "schedule.run")
        assert run["actor"] == "scheduler" and run["actor_kind"] == "system"
        cli = subprocess.run(
            [APPLIANCE, "agent", "schedule", AGENT, "--json"], env=env, capture_output=True
        )
        assert cli.returncode == 0, cli.stderr
        assert json.loads(cli.stdout)[0]["runs"] >= 1
        table = subprocess.run(
            [APPLIANCE, "agent", "schedule", AGENT], env=env, capture_output=True, text=True
        )
        assert table.returncode == 0, table.stderr
        assert "every 1m" in table.stdout and "schedule-0" in table.stdout, table.stdout
        missing = subprocess.run(
            [APPLIANCE, "agent", "schedule", "nobody"], env=env, capture_output=True, text=True
        )
        assert missing.returncode == 5, missing.stderr  # NotFound, one line, no traceback
        assert "appliance: error: no agent named 'nobody'" in missing.stderr
        assert "Traceback" not in missing.stderr

        # 2. Held by the kill switch: the next run is skipped with the hold as its reason.
        held = subprocess.run(
            [APPLIANCE, "kill", "--all", "--hold"], env=env, capture_output=True, text=True
        )
        assert held.returncode == 0, held.stderr
        turns_before = len(_scheduled_turns(client))
        skipped = _wait(
            "a skipped run",
            75,
            lambda: [
                e for e in client.get(f"/agents/{AGENT}/schedule").json() if e["last_skip_at"]
            ],
        )
        reason = skipped[0]["last_skip_reason"]
        assert "kill switch" in reason, skipped
        assert skipped[0]["last_outcome"] == "ok", skipped  # the last run's, not hidden
        assert len(_scheduled_turns(client)) == turns_before  # no turn ran
        [refused, *_] = _scheduled_turns(client, refused=True)  # in the transcript all the same
        assert refused["refused"] == reason and refused["actor"] == "scheduler", refused
        assert refused["ok"] is False and refused["message"] == "tick", refused
        [skip, *_] = _audit(state, "schedule.skipped")
        assert skip["reason"] == reason and skip["actor"] == "scheduler"
        assert any(
            r.get("refused") == reason and r.get("trigger") == "schedule"
            for r in _audit(state, "agent.turn")
        )
        status = subprocess.run(
            [APPLIANCE, "status", "--json"], env=env, capture_output=True, text=True
        )
        [row] = [a for a in json.loads(status.stdout)["agents"]["agents"] if a["name"] == AGENT]
        assert row["schedule"]["last_skip_reason"] == reason, row
        assert row["schedule"]["last_outcome"] == "ok", row
        table = subprocess.run(
            [APPLIANCE, "agent", "schedule", AGENT, "--json"], env=env, capture_output=True
        )
        assert json.loads(table.stdout)[0]["last_skip_reason"] == reason

        # 3. Released and started again; then a graceful stop parks it.
        assert client.post("/release").status_code == 200
        started = client.post(f"/agents/{AGENT}/start")
        assert started.status_code == 200, started.text
        stop_began = time.monotonic()
        plane.send_signal(signal.SIGTERM)
        assert plane.wait(30) == 0 or plane.returncode == -signal.SIGTERM
        stopped_in = time.monotonic() - stop_began
    assert stopped_in < 30, stopped_in
    [parked] = _audit(state, "sandbox.parked")
    assert parked["reason"] == "control plane shutdown" and parked["order"] == 1, parked
    [shutdown] = _audit(state, "control.shutdown")
    assert shutdown["parked"] == [AGENT] and shutdown["actor"] == "control-plane"
    assert shutdown["order"] == [AGENT], shutdown
    container = _container_state(env)
    assert container in ("exited", "stopped"), container

    # 4. The next control plane brings it back (reconcile: its recorded state is `running`).
    restart_began = time.monotonic()
    with running_control_plane(env, state), _client(state) as client:
        back = _wait(
            "the parked agent running again",
            60,
            lambda: client.get(f"/sandboxes/{AGENT}").json().get("container") == "running",
            every=0.2,
        )
        assert back
        assert client.get("/agents").json()[0]["state"] == "running"
        back_in = time.monotonic() - restart_began
    print(
        f"\nfigures: first scheduled turn {took:.1f} s after the create; SIGTERM to exit "
        f"{stopped_in:.1f} s (parking {shutdown['duration_s']} s); running again "
        f"{back_in:.1f} s after the next control plane started"
    )


def _container_state(env: dict[str, str]) -> str | None:
    """The agent's container as Podman has it, from `appliance status` (read-only: the control
    plane is down, the Podman service still runs)."""
    out = subprocess.run([APPLIANCE, "status", "--json"], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)["sandboxes"]["sandboxes"]
    [row] = [r for r in rows if r["name"] == AGENT]
    assert row["state"] == "running", row  # parked: the recorded state is kept
    return row["container"]
