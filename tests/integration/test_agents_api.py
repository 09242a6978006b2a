"""Agents through the control plane's API (a real `appliance serve control`, httpx over its unix
socket) and the CLI as its client: five parallel creates of one name make one agent (the others
409), a turn of the command runtime, stop/start/rm, every change audited with who made it.

The command runtime keeps this cheap (the base image, no model); the OpenClaw turn through the
same path is tests/e2e/test_agent_openclaw.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml

from tests.agent_fixtures import (
    APPLIANCE,
    TURN,
    agent_audit,
    api_client,
    blueprint_doc,
    catalog_env,
    remove_agents,
    run_cli,
    sandbox_root,
)
from tests.control_fixtures import running_control_plane
from tests.helpers import cli_env, free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def plane() -> Iterator[dict[str, str]]:
    with sandbox_root() as root:
        env = catalog_env(root)
        with running_control_plane(env, root / "s"):
            yield env
            remove_agents(env)


def test_parallel_creates_of_one_name_make_one_agent(plane: dict[str, str]) -> None:
    name = f"race-{os.getpid()}"

    def create(_: int) -> httpx.Response:
        with api_client(plane) as client:
            return client.post("/agents", json={"name": name, "blueprint": "quiet@1.0.0"})

    with ThreadPoolExecutor(5) as pool:
        responses = list(pool.map(create, range(5)))

    assert sorted(r.status_code for r in responses) == [201, 409, 409, 409, 409]
    [made] = [r.json() for r in responses if r.status_code == 201]
    assert made["blueprint"] == "quiet@1.0.0" and made["name"] == name
    assert made["enforcement"]["landlock"]["enforced"] is True
    for refused in (r.json()["error"] for r in responses if r.status_code == 409):
        assert refused["type"] == "conflict" and f"{name!r} exists" in refused["message"]
        assert refused["hint"] == f"`appliance agent rm {name}` first"
    with api_client(plane) as client:
        assert [a["name"] for a in client.get("/agents").json()].count(name) == 1
        assert [s["name"] for s in client.get("/sandboxes").json()].count(name) == 1
    [deployed] = [r for r in agent_audit(plane, name) if r["event"] == "agent.deploy"]
    assert deployed["actor"] == f"uid:{os.geteuid()}" and deployed["actor_kind"] == "unix"

    # The CLI gets the same conflict as its exit code (10), in one line.
    again = run_cli(plane, "agent", "create", name, "--blueprint", "quiet@1.0.0")
    assert again.returncode == 10, again.stderr
    assert "appliance: error: " in again.stderr and "Traceback" not in again.stderr


def test_a_turn_through_the_api_and_therun_cli(plane: dict[str, str]) -> None:
    name = f"turns-{os.getpid()}"
    with api_client(plane) as client:
        assert client.post("/agents", json={"name": name, "blueprint": "echoer"}).status_code == 201
        message = "hello; $(id) `id` --json"
        turn = client.post(f"/agents/{name}/turns", json={"message": message, "session": "s-1"})
        assert turn.status_code == 200, turn.text
        result = turn.json()
        assert result["ok"] is True and result["exit_code"] == 0
        assert result["reply"] == f"s-1|{message}"  # as sent: no shell saw it
        assert result["session"] == "s-1" and result["raw"] is None

        bad = client.post(f"/agents/{name}/turns", json={"message": "x", "session": "../etc"})
        assert bad.status_code == 422 and bad.json()["error"]["type"] == "config_error"
        missing = client.post("/agents/nosuch/turns", json={"message": "x"})
        assert missing.status_code == 404 and missing.json()["error"]["hint"]

    # The CLI: a new session each run unless named; the reply printed, or the whole record.
    out = run_cli(plane, "agent", "run", name, "second", "--json")
    assert out.returncode == 0, out.stderr
    record = json.loads(out.stdout)
    assert record["reply"].endswith("|second") and record["session"].startswith("run-")
    assert "stderr_tail" not in record  # `--json` prints what it printed before the API
    plain = run_cli(plane, "agent", "run", name, "third", "--session", "s-1")
    assert plain.returncode == 0 and plain.stdout == "s-1|third\n"

    transcript = run_cli(plane, "agent", "transcript", name, "--json")
    assert [t["message"] for t in json.loads(transcript.stdout)] == [message, "second", "third"]
    turns = [r for r in agent_audit(plane, name) if r["event"] == "agent.turn"]
    assert len(turns) == 3 and all(r["actor_kind"] == "unix" for r in turns)


def test_a_long_turn_does_not_hold_up_stop(plane: dict[str, str]) -> None:
    """A turn takes no lock: `agent stop` (or the kill switch) acts at once and the turn it cut
    off is not reported as answered."""
    name = f"slow-{os.getpid()}"
    with api_client(plane) as client:
        assert client.post("/agents", json={"name": name, "blueprint": "slow"}).status_code == 201
    with ThreadPoolExecutor(1) as pool:
        turn = pool.submit(
            lambda: api_client(plane).post(f"/agents/{name}/turns", json={"message": "x"})
        )
        time.sleep(2)  # the turn's `sleep 20` is running in the sandbox
        t0 = time.monotonic()
        stopped = run_cli(plane, "agent", "stop", name, "--json")
        stop_s = time.monotonic() - t0
        assert stopped.returncode == 0, stopped.stderr
        answer = turn.result(timeout=60)
    assert stop_s < 15, stop_s  # not the 18 s the turn had left: stop did not wait for it
    assert answer.status_code == 200 and answer.json()["ok"] is False, answer.text
    assert answer.json()["reply"] != "late"  # cut off, not answered
    assert run_cli(plane, "agent", "rm", name).returncode == 0


def test_a_runtime_without_turns_says_so(plane: dict[str, str]) -> None:
    name = f"noturn-{os.getpid()}"
    assert run_cli(plane, "agent", "create", name, "--blueprint", "quiet").returncode == 0
    out = run_cli(plane, "agent", "run", name, "hello")
    assert out.returncode != 0 and "takes no turns" in out.stderr
    assert "hint: `appliance sandbox exec" in out.stderr


def test_stop_start_and_rm_through_therun_cli(plane: dict[str, str]) -> None:
    name = f"life-{os.getpid()}"
    assert run_cli(plane, "agent", "create", name, "--blueprint", "quiet").returncode == 0
    stopped = run_cli(plane, "agent", "stop", name, "--json")
    assert stopped.returncode == 0 and json.loads(stopped.stdout)["state"] == "stopped"
    started = run_cli(plane, "agent", "start", name, "--json")
    assert started.returncode == 0 and json.loads(started.stdout)["state"] == "running"
    listed = json.loads(run_cli(plane, "agent", "list", "--json").stdout)
    assert [r["state"] for r in listed if r["name"] == name] == ["running"]

    assert run_cli(plane, "agent", "rm", name).returncode == 0
    gone = run_cli(plane, "agent", "rm", name)
    assert gone.returncode == 5 and "no agent named" in gone.stderr  # NotFound: exit 5
    events = [r["event"] for r in agent_audit(plane, name)]
    assert events == ["agent.deploy", "agent.stop", "agent.start", "agent.rm"]


def test_upgrade_and_rollback_through_therun_cli(plane: dict[str, str]) -> None:
    name = f"upg-{os.getpid()}"
    assert run_cli(plane, "agent", "create", name, "--blueprint", "quiet@1.0.0").returncode == 0
    up = run_cli(plane, "blueprint", "upgrade", name, "--to", "1.1.0")  # a bare version: quiet's
    assert up.returncode == 0 and up.stdout == f"{name} now runs quiet@1.1.0\n", up.stderr
    same = run_cli(plane, "blueprint", "upgrade", name, "--to", "1.1.0")
    assert same.returncode == 1 and "already runs quiet@1.1.0" in same.stderr
    back = run_cli(plane, "blueprint", "rollback", name)
    assert back.returncode == 0 and back.stdout == f"{name} is back on quiet@1.0.0\n", back.stderr
    listed = json.loads(run_cli(plane, "agent", "list", "--json").stdout)
    [row] = [r for r in listed if r["name"] == name]
    assert row["blueprint"] == "quiet@1.0.0" and row["daily_budget"] == 1000
    logs = run_cli(plane, "agent", "logs", name)
    assert logs.returncode == 0, logs.stderr
    deploys = [r for r in agent_audit(plane, name) if r["event"] == "agent.deploy"]
    assert [r["reason"] for r in deploys] == [
        "created",
        "upgrade from quiet@1.0.0",
        "rollback from quiet@1.1.0",
    ]
    assert all(r["actor_kind"] == "unix" for r in deploys)
    assert run_cli(plane, "agent", "rm", name).returncode == 0


def test_a_blueprint_file_is_read_by_the_cli_and_sent_as_text(
    plane: dict[str, str], tmp_path: Path
) -> None:
    """`--blueprint ./x.yaml` is read by the CLI, as the operator and from the operator's working
    directory; the control plane gets its YAML text, never a path (a path as a reference: 422)."""
    name = f"file-{os.getpid()}"
    here = Path(tempfile.mkdtemp(prefix="aa-cwd-"))
    (here / "mine.yaml").write_text(yaml.safe_dump(blueprint_doc("mine")))
    try:
        made = subprocess.run(
            [APPLIANCE, "agent", "create", name, "--blueprint", "./mine.yaml", "--json"],
            env=plane, cwd=here, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert made.returncode == 0, made.stderr
        assert json.loads(made.stdout)["blueprint"] == "mine@1.0.0"
        with api_client(plane) as client:
            relative = client.post("/agents", json={"name": "rel", "blueprint": "./mine.yaml"})
        assert relative.status_code == 422, relative.text
        (here / "bad.yaml").write_text("name: mine\nversion: [1.0.0\n")
        bad = subprocess.run(
            [APPLIANCE, "agent", "create", "bad", "--blueprint", "bad.yaml"],
            env=plane, cwd=here, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert bad.returncode == 3 and "bad.yaml:3:" in bad.stderr, bad.stderr
        assert (
            run_cli(plane, "agent", "create", f"{name}-up", "--blueprint", "quiet").returncode == 0
        )
        newer = blueprint_doc("quiet") | {"version": "1.2.0"}
        (here / "newer.yaml").write_text(yaml.safe_dump(newer))
        up = subprocess.run(
            [APPLIANCE, "blueprint", "upgrade", f"{name}-up", "--to", "newer.yaml"],
            env=plane, cwd=here, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert up.returncode == 0 and "now runs quiet@1.2.0" in up.stdout, up.stderr
    finally:
        run_cli(plane, "agent", "rm", f"{name}-up")
        run_cli(plane, "agent", "rm", name)
        shutil.rmtree(here, ignore_errors=True)


def test_an_agent_from_a_file_the_catalog_lacks_takes_turns_upgrades_and_rolls_back(
    plane: dict[str, str],
) -> None:
    """The control plane keeps the blueprint a file sent with its deployment: turns, upgrade
    and rollback need no catalog entry (the catalog has no `filed` at all)."""
    name = f"filed-{os.getpid()}"
    here = Path(tempfile.mkdtemp(prefix="aa-cwd-"))
    v2_turn = ["sh", "-c", 'printf "v2:%s" "$AGENT_MESSAGE"']
    (here / "v1.yaml").write_text(yaml.safe_dump(blueprint_doc("filed", turn=TURN)))
    v2 = blueprint_doc("filed", turn=v2_turn) | {"version": "1.1.0"}
    (here / "v2.yaml").write_text(yaml.safe_dump(v2))

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [APPLIANCE, *args], env=plane, cwd=here, capture_output=True, text=True, timeout=600
        )

    try:
        made = cli("agent", "create", name, "--blueprint", "v1.yaml", "--json")
        assert made.returncode == 0, made.stderr
        assert json.loads(made.stdout)["blueprint"] == "filed@1.0.0"
        first = cli("agent", "run", name, "one", "--session", "s-1")
        assert (first.returncode, first.stdout) == (0, "s-1|one\n"), first.stderr

        newest = cli("blueprint", "upgrade", name)  # the catalog's newest: it has none
        assert newest.returncode == 5 and "runs filed@1.0.0 from a file" in newest.stderr
        assert "--to FILE" in newest.stderr and "Traceback" not in newest.stderr
        up = cli("blueprint", "upgrade", name, "--to", "v2.yaml")
        assert up.returncode == 0 and up.stdout == f"{name} now runs filed@1.1.0\n", up.stderr
        second = cli("agent", "run", name, "two")
        assert (second.returncode, second.stdout) == (0, "v2:two\n"), second.stderr

        back = cli("blueprint", "rollback", name)
        assert back.returncode == 0, back.stderr
        assert back.stdout == f"{name} is back on filed@1.0.0\n"
        third = cli("agent", "run", name, "three", "--session", "s-1")
        assert (third.returncode, third.stdout) == (0, "s-1|three\n"), third.stderr

        deploys = [r for r in agent_audit(plane, name) if r["event"] == "agent.deploy"]
        assert [(r["blueprint"], r["origin"]) for r in deploys] == [
            ("filed@1.0.0", "client"),
            ("filed@1.1.0", "client"),
            ("filed@1.0.0", "client"),
        ]
        turns = [r for r in agent_audit(plane, name) if r["event"] == "agent.turn"]
        assert len(turns) == 3 and all(r["ok"] for r in turns)
    finally:
        run_cli(plane, "agent", "rm", name)
        shutil.rmtree(here, ignore_errors=True)


def test_agents_survive_a_killed_control_plane() -> None:
    """`kill -9` of the control plane loses no agent: after a restart the same agents run, their
    sessions and transcripts continue, and a name is still taken (409)."""
    with sandbox_root() as root:
        env = catalog_env(root)
        with running_control_plane(env, root / "s") as proc, api_client(env) as client:
            for name in ("k-echo", "k-quiet"):
                blueprint = "echoer" if name == "k-echo" else "quiet"
                made = client.post("/agents", json={"name": name, "blueprint": blueprint})
                assert made.status_code == 201, made.text
            turn = client.post("/agents/k-echo/turns", json={"message": "one", "session": "s"})
            assert turn.json()["reply"] == "s|one"
            before = client.get("/agents").json()
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(30)
        try:
            with running_control_plane(env, root / "s"), api_client(env) as client:
                after = client.get("/agents").json()
                assert [(a["name"], a["blueprint"], a["state"]) for a in after] == [
                    (a["name"], a["blueprint"], a["state"]) for a in before
                ]
                assert {a["state"] for a in after} == {"running"}
                turn = client.post("/agents/k-echo/turns", json={"message": "two", "session": "s"})
                assert turn.status_code == 200 and turn.json()["reply"] == "s|two"
                transcript = client.get("/agents/k-echo/transcript").json()
                assert [t["message"] for t in transcript] == ["one", "two"]
                again = client.post("/agents", json={"name": "k-quiet", "blueprint": "quiet"})
                assert again.status_code == 409
        finally:
            with running_control_plane(env, root / "s"):
                remove_agents(env)


def test_mutating_agent_commands_need_the_control_plane(tmp_path: Path) -> None:
    """Nothing answers on the socket: one line, exit 7, hint `appliance up` (no Podman needed)."""
    env = cli_env(tmp_path / "s", tmp_path)
    for argv in (
        ["agent", "create", "x", "--blueprint", "shell"],
        ["agent", "run", "x", "hi"],
        ["agent", "rm", "x"],
        ["blueprint", "rollback", "x"],
    ):
        out = run_cli(env, *argv)
        assert out.returncode == 7, (argv, out.stderr)
        lines = out.stderr.strip().splitlines()
        assert lines[0].startswith("appliance: error: the control plane is not running"), argv
        assert "appliance up" in out.stderr and "Traceback" not in out.stderr


def test_agent_routes_by_role_on_the_port(tmp_path: Path) -> None:
    """Over the loopback port with operator tokens: anonymous 401; a viewer lists agents but
    changes nothing and reads no transcript (403); no one names a blueprint file (422): catalog
    references, or a blueprint's YAML text."""
    state = tmp_path / "state"
    port = free_port()
    env = cli_env(state, tmp_path, APPLIANCE_CONTROL__PORT=str(port))
    with running_control_plane(env, state):
        tokens = {}
        for role in ("viewer", "operator"):
            made = run_cli(env, "operators", "create", f"{role}-1", "--role", role, "--json")
            assert made.returncode == 0, made.stderr
            tokens[role] = json.loads(made.stdout)["secret"]

        def tcp(token: str | None) -> httpx.Client:
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            return httpx.Client(base_url=f"http://127.0.0.1:{port}/api/v1", headers=headers)

        create = {"name": "a1", "blueprint": "shell"}
        with tcp(None) as anonymous:
            assert anonymous.get("/agents").status_code == 401
            assert anonymous.post("/agents", json=create).status_code == 401
        with tcp(tokens["viewer"]) as viewer:
            assert viewer.get("/agents").json() == []
            for refused in (
                viewer.post("/agents", json=create),
                viewer.post("/agents/a1/turns", json={"message": "hi"}),
                viewer.post("/agents/a1/stop"),
                viewer.delete("/agents/a1"),
                viewer.get("/agents/a1/transcript"),
            ):
                assert refused.status_code == 403 and refused.json()["error"]["type"] == "forbidden"
        with tcp(tokens["operator"]) as operator:
            for path in ("/etc/shadow.yaml", "../../etc/x", "/root/bp/blueprint.yml"):
                refused = operator.post("/agents", json={"name": "a1", "blueprint": path})
                assert refused.status_code == 422, refused.text
                assert "NAME[@VERSION]" in refused.json()["error"]["message"]
            upgrade = operator.post("/agents/a1/upgrade", json={"version": "/etc/x.yaml"})
            assert upgrade.status_code == 422
            assert operator.get("/agents/a1/transcript").json() == []  # no such agent: no turns
            assert operator.get("/agents/a%20b/transcript").status_code == 422  # the name rule


def test_no_socket_peer_makes_the_control_plane_read_a_host_file(tmp_path: Path) -> None:
    """The control plane runs as root: a path where a blueprint reference goes is refused (422),
    for a socket peer too, and a root-only file's content appears in no answer. A blueprint's
    `sandbox.base` names a policy, never a file. (No Podman needed: nothing gets that far.)"""
    state = tmp_path / "state"
    secret = tmp_path / "root-only.yaml"
    secret.write_text("hunter2-secret-marker: 1\nroot:$6$saltsalt$hash:19000:0:99999:7:::\n")
    secret.chmod(0o600)
    env = cli_env(state, tmp_path)
    with running_control_plane(env, state), api_client(env) as client:
        answers = []
        for path in (str(secret), "/etc/shadow", "../../etc/shadow", "x.yaml", "a/b"):
            answers.append(client.post("/agents", json={"name": "a1", "blueprint": path}))
            answers.append(client.post("/agents/a1/upgrade", json={"version": path}))
        base = {**blueprint_doc("mine"), "sandbox": {"base": str(secret.with_suffix(""))}}
        answers.append(
            client.post("/agents", json={"name": "a1", "blueprint_yaml": yaml.safe_dump(base)})
        )
        for answer in answers:
            assert answer.status_code == 422, answer.text
            assert answer.json()["error"]["type"] in ("invalid_request", "config_error")
            assert "hunter2" not in answer.text and "saltsalt" not in answer.text
        both = {"name": "a1", "blueprint": "quiet", "blueprint_yaml": "name: x\n"}
        assert client.post("/agents", json=both).status_code == 422  # one source, not two
        assert client.get("/agents").json() == []
