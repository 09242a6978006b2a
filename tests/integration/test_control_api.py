"""The control plane's API through a real `appliance serve control`: its unix socket (httpx with a
unix transport; the peer is an admin by SO_PEERCRED) and its loopback port (operator tokens).

Auth: no token, a bad token, a revoked token -> 401; a role too low -> 403; all in the one JSON
error shape. Every mutation and every refusal is in the hash-chained audit log with who, and no
token is anywhere in it. Operators are made and revoked through the CLI, as an operator would.
"""

from __future__ import annotations

import grp
import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from appliance.audit import verify
from tests.control_fixtures import control_socket, running_control_plane
from tests.helpers import cli_env, free_port

pytestmark = pytest.mark.integration

APPLIANCE = str(Path(sys.executable).parent / "appliance")
HOSTILE_NAMES = ["../etc", "Admin", "a b", "x" * 64, "op\nx", "supervisor", "-rf", "ünï"]


@dataclass
class Plane:
    env: dict[str, str]
    state: Path
    port: int

    def unix(self) -> httpx.Client:
        transport = httpx.HTTPTransport(uds=str(control_socket(self.state)))
        return httpx.Client(transport=transport, base_url="http://control/api/v1")

    def tcp(self, token: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        return httpx.Client(base_url=f"http://127.0.0.1:{self.port}/api/v1", headers=headers)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        argv = [APPLIANCE, *args]
        return subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=60)

    def audit(self) -> list[dict]:
        path = self.state / "audit" / "audit.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()]

    def requests(self) -> list[dict]:
        return [r for r in self.audit() if r["event"] == "control.request"]


@pytest.fixture
def plane(tmp_path: Path) -> Iterator[Plane]:
    state = tmp_path / "state"
    port = free_port()
    env = cli_env(state, tmp_path, APPLIANCE_CONTROL__PORT=str(port))
    with running_control_plane(env, state):
        yield Plane(env, state, port)


def operator_token(plane: Plane, name: str, role: str) -> str:
    made = plane.cli("operators", "create", name, "--role", role, "--json")
    assert made.returncode == 0, made.stderr
    data = json.loads(made.stdout)
    assert data["name"] == name and data["role"] == role and data["state"] == "live"
    assert data["secret"].startswith("sk-op-")
    return data["secret"]


def anonymous_refusals(plane: Plane, total: int, timeout: float = 30.0) -> list[dict]:
    """The records of anonymous refusals, once they account for `total` refusals (a window
    closes REFUSAL_WINDOW_S after it opened); at most one record per window."""
    deadline = time.monotonic() + timeout
    while True:
        records = [r for r in plane.requests() if r["actor"] == "anonymous"]
        if sum(r["refusals"] for r in records) >= total or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    assert sum(r["refusals"] for r in records) == total, records
    return records


def assert_error_shape(response: httpx.Response, status: int, type_: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "code", "hint"}
    assert body["error"]["type"] == type_ and body["error"]["message"]


def test_socket_mode_and_openapi_lists_the_routes(plane: Plane) -> None:
    """0660 and group appliance-admin where that group exists (root gives it the socket); else
    0600, its owner only (the API's only admin then)."""
    info = control_socket(plane.state).stat()
    try:
        group = grp.getgrnam("appliance-admin").gr_gid
    except KeyError:
        group = None
    assert stat.S_ISSOCK(info.st_mode)
    if group is not None and os.geteuid() == 0:
        assert stat.S_IMODE(info.st_mode) == 0o660 and info.st_gid == group
    elif group is None:
        assert stat.S_IMODE(info.st_mode) == 0o600
    with plane.unix() as client:
        paths = client.get("/openapi.json").json()["paths"]
    for route in (
        "/api/v1/status",
        "/api/v1/operators",
        "/api/v1/operators/{name}",
        "/api/v1/keys",
        "/api/v1/keys/{name_or_id}",
        "/api/v1/budgets",
        "/api/v1/budgets/{key}",
        "/api/v1/audit",
        "/api/v1/audit/verify",
    ):
        assert route in paths, route


def test_tokens_and_roles_on_the_port(plane: Plane) -> None:
    viewer = operator_token(plane, "viewer-1", "viewer")
    operator = operator_token(plane, "ops-1", "operator")
    admin = operator_token(plane, "root-1", "admin")
    assert plane.cli("keys", "create", "laptop").returncode == 0
    limits = {"daily_tokens": 100}

    with plane.tcp() as anonymous:
        assert_error_shape(anonymous.get("/budgets"), 401, "unauthorized")
        assert_error_shape(anonymous.put("/budgets/laptop", json=limits), 401, "unauthorized")
    with plane.tcp("sk-op-not-a-token") as forged:
        assert_error_shape(forged.get("/budgets"), 401, "unauthorized")
    with plane.tcp(viewer) as client:
        assert client.get("/budgets").status_code == 200
        assert_error_shape(client.put("/budgets/laptop", json=limits), 403, "forbidden")
        assert_error_shape(client.get("/operators"), 403, "forbidden")
    with plane.tcp(operator) as client:
        row = client.put("/budgets/laptop", json=limits).json()
        assert [(x["budget"], x["limit"]) for x in row["limits"]] == [("daily_tokens", 100)]
        assert_error_shape(client.post("/keys", json={"name": "k2"}), 403, "forbidden")
    with plane.tcp(admin) as client:
        made = client.post("/keys", json={"name": "k2"})
        assert made.status_code == 201 and made.json()["secret"].startswith("sk-app-")
        assert client.delete("/operators/ops-1").json()["state"] == "revoked"
    with plane.tcp(operator) as revoked:
        assert_error_shape(revoked.get("/budgets"), 401, "unauthorized")
        assert_error_shape(revoked.put("/budgets/laptop", json=limits), 401, "unauthorized")

    listed = json.loads(plane.cli("operators", "list", "--json").stdout)
    assert {(o["name"], o["state"]) for o in listed} == {
        ("viewer-1", "live"), ("ops-1", "revoked"), ("root-1", "live")
    }  # fmt: skip
    assert all("secret" not in o for o in listed)

    # Every mutation and every refusal, with who; never a token.
    seen = [
        (r["method"], r["path"], r["status"], r["actor"], r["actor_kind"]) for r in plane.requests()
    ]
    expected = [
        ("PUT", "/api/v1/budgets/laptop", 403, "viewer-1", "token"),
        ("GET", "/api/v1/operators", 403, "viewer-1", "token"),
        ("PUT", "/api/v1/budgets/laptop", 200, "ops-1", "token"),
        ("POST", "/api/v1/keys", 403, "ops-1", "token"),
        ("POST", "/api/v1/keys", 201, "root-1", "token"),
        ("DELETE", "/api/v1/operators/ops-1", 200, "root-1", "token"),
    ]
    assert [s for s in seen if s[3] not in (f"uid:{os.getuid()}", "anonymous")] == expected
    # The CLI's calls came over the socket: the peer's uid (and pid) as the kernel tells it.
    by_cli = [r for r in plane.requests() if r["actor_kind"] == "unix"]
    assert [(r["method"], r["path"], r["status"]) for r in by_cli] == [
        ("POST", "/api/v1/operators", 201),
        ("POST", "/api/v1/operators", 201),
        ("POST", "/api/v1/operators", 201),
        ("POST", "/api/v1/keys", 201),
    ]
    assert all(r["actor_uid"] == os.getuid() and r["actor_pid"] > 0 for r in by_cli)
    # The five anonymous refusals (no token, a forged one, a revoked one): the first recorded at
    # once, the rest counted into the record that closes its address's window.
    anonymous_records = anonymous_refusals(plane, 5)
    first = anonymous_records[0]
    assert (first["method"], first["path"], first["status"]) == ("GET", "/api/v1/budgets", 401)
    assert first["refusals"] == 1
    assert all(r["client"].startswith("127.0.0.1:") for r in anonymous_records)
    created = [r for r in plane.audit() if r["event"] == "operator.created"]
    assert [(r["name"], r["role"], r["actor_kind"]) for r in created] == [
        ("viewer-1", "viewer", "unix"), ("ops-1", "operator", "unix"), ("root-1", "admin", "unix")
    ]  # fmt: skip
    text = (plane.state / "audit" / "audit.jsonl").read_text()
    for secret in (viewer, operator, admin, "sk-op-not-a-token"):
        assert secret not in text
    assert verify(plane.state / "audit" / "audit.jsonl").ok


def test_the_unix_peer_is_recorded_with_its_pid(plane: Plane) -> None:
    with plane.unix() as client:
        assert client.post("/keys", json={"name": "from-test"}).status_code == 201
        assert_error_shape(client.delete("/keys/nobody"), 404, "not_found")
    (made, missing) = plane.requests()[-2:]
    assert made["actor"] == f"uid:{os.getuid()}" and made["actor_pid"] == os.getpid()
    # The login uid (the user behind a sudo), whatever this process's is: there when set.
    loginuid = Path("/proc/self/loginuid")
    own = int(loginuid.read_text()) if loginuid.exists() else 4294967295
    assert made.get("actor_loginuid") == (None if own == 4294967295 else own)
    assert (missing["method"], missing["status"]) == ("DELETE", 404)


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_a_hostile_operator_name_is_refused_and_leaves_nothing(plane: Plane, name: str) -> None:
    with plane.unix() as client:
        answer = client.post("/operators", json={"name": name, "role": "admin"})
        assert_error_shape(answer, 422, "config_error")
        assert "invalid operator name" in answer.json()["error"]["message"]
        assert client.get("/operators").json() == []
    done = plane.cli("operators", "create", "--role", "viewer", "--", name)
    assert done.returncode == 3, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 2 and lines[0].startswith("appliance: error: invalid operator name")
    assert lines[1].startswith("  hint: ")
    assert not [r for r in plane.audit() if r["event"].startswith("operator.")]


def test_a_second_live_operator_of_one_name_is_refused(plane: Plane) -> None:
    operator_token(plane, "alice", "viewer")
    again = plane.cli("operators", "create", "alice", "--role", "admin")
    assert again.returncode == 10 and "already exists" in again.stderr  # a conflict
    assert "hint: `appliance operators list`" in again.stderr
    assert plane.cli("operators", "revoke", "alice").returncode == 0
    operator_token(plane, "alice", "admin")  # the name is free again
    gone = plane.cli("operators", "revoke", "nobody")
    assert gone.returncode == 5 and "no live operator" in gone.stderr


def test_parallel_creates_of_one_operator_make_one(plane: Plane) -> None:
    """Eight clients at once: one operator (one token that works), seven clear refusals, and
    every request in the audit chain, which still verifies."""

    def create(_: int) -> httpx.Response:
        with plane.unix() as client:
            return client.post("/operators", json={"name": "race", "role": "operator"})

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(create, range(8)))
    made = [a for a in answers if a.status_code == 201]
    assert len(made) == 1, [a.text for a in answers]
    for refused in (a for a in answers if a.status_code != 201):
        assert_error_shape(refused, 409, "conflict")
        assert "already exists" in refused.json()["error"]["message"]
    with plane.tcp(made[0].json()["secret"]) as client:
        assert client.get("/budgets").status_code == 200
    posts = [r for r in plane.requests() if r["path"] == "/api/v1/operators"]
    assert sorted(r["status"] for r in posts) == [201] + [409] * 7
    assert len([r for r in plane.audit() if r["event"] == "operator.created"]) == 1
    assert verify(plane.state / "audit" / "audit.jsonl").ok


def test_audit_tail_and_verify_through_the_api(plane: Plane) -> None:
    for n in range(3):
        assert plane.cli("keys", "create", f"k{n}").returncode == 0
    with plane.unix() as client:
        page = client.get("/audit", params={"limit": 2, "event": "key.*"}).json()
        assert [r["name"] for r in page["records"]] == ["k1", "k2"]
        assert client.get("/audit", params={"after": page["next"]}).json()["records"] == []
        client.delete("/keys/k0")
        later = client.get("/audit", params={"after": page["next"], "event": "key.*"}).json()
        assert [r["event"] for r in later["records"]] == ["key.revoked"]
        checked = client.get("/audit/verify").json()
        assert checked["ok"] is True and checked["last_seq"] == len(plane.audit())
    tail = json.loads(plane.cli("audit", "tail", "-n", "1", "--event", "key.*", "--json").stdout)
    assert [r["event"] for r in tail] == ["key.revoked"]


def test_commands_that_change_state_need_the_control_plane(tmp_path: Path) -> None:
    env = cli_env(tmp_path / "state", tmp_path)
    for argv in (
        ["keys", "create", "laptop"],
        ["keys", "revoke", "laptop"],
        ["budget", "set", "laptop", "--daily-tokens", "5"],
        ["operators", "create", "alice", "--role", "viewer"],
        ["operators", "revoke", "alice"],
    ):
        done = subprocess.run([APPLIANCE, *argv], env=env, capture_output=True, text=True)
        assert done.returncode == 7, (argv, done.stderr)
        lines = done.stderr.splitlines()
        assert len(lines) == 2 and "control plane is not running" in lines[0], done.stderr
        assert lines[1] == "  hint: start it with `appliance up`"
    # The read-only ones that must work with nothing running still do.
    verified = subprocess.run([APPLIANCE, "audit", "verify"], env=env, capture_output=True)
    assert verified.returncode == 0


def test_a_non_loopback_port_is_refused_unless_meant(tmp_path: Path) -> None:
    env = cli_env(tmp_path / "state", tmp_path)
    env.update(APPLIANCE_CONTROL__HOST="0.0.0.0", APPLIANCE_CONTROL__PORT=str(free_port()))
    done = subprocess.run(
        [APPLIANCE, "serve", "control"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 3
    assert "not a loopback address" in done.stderr and "allow_non_loopback" in done.stderr
    assert not control_socket(tmp_path / "state").exists()  # refused before binding anything


def test_key_and_budget_changes_are_audited_with_who(plane: Plane) -> None:
    admin = operator_token(plane, "root-1", "admin")
    with plane.unix() as client:
        made = client.post("/keys", json={"name": "laptop", "allowed_models": ["nemotorn"]})
        assert made.status_code == 201
        assert made.json()["warnings"] == [
            "model 'nemotorn' is not served here (not the served model, an alias or an upstream "
            "model): it allows nothing until the config names it"
        ]
        assert client.post("/keys", json={"name": "open"}).json()["warnings"] == []
        assert client.put("/budgets/laptop", json={"daily_tokens": 5}).status_code == 200
    with plane.tcp(admin) as client:
        assert client.put("/budgets/open", json={"monthly_tokens": 9}).status_code == 200
        assert client.delete("/keys/laptop").status_code == 200
    events = {r["event"]: r for r in plane.audit() if r["event"].startswith(("key.", "budget."))}
    records = [r for r in plane.audit() if r["event"].startswith(("key.", "budget."))]
    assert [(r["event"], r["actor"], r["actor_kind"]) for r in records] == [
        ("key.created", f"uid:{os.getuid()}", "unix"),
        ("key.created", f"uid:{os.getuid()}", "unix"),
        ("budget.set", f"uid:{os.getuid()}", "unix"),
        ("budget.set", "root-1", "token"),
        ("key.revoked", "root-1", "token"),
    ]
    assert records[0]["actor_uid"] == os.getuid() and records[0]["actor_pid"] == os.getpid()
    assert events["key.revoked"]["name"] == "laptop" and "actor_uid" not in events["key.revoked"]
    # --json prints the key as before (the warnings go to stderr).
    done = plane.cli("keys", "create", "typo", "--allow-model", "nemotorn", "--json")
    assert done.returncode == 0 and "warnings" not in json.loads(done.stdout)
    assert "warning: model 'nemotorn' is not served here" in done.stderr


def test_a_second_live_key_of_one_name_is_a_conflict(plane: Plane) -> None:
    assert plane.cli("keys", "create", "laptop").returncode == 0
    again = plane.cli("keys", "create", "laptop")
    assert again.returncode == 10, again.stderr
    lines = again.stderr.splitlines()
    assert lines[0] == "appliance: error: a live key named 'laptop' already exists"
    assert lines[1].startswith("  hint: `appliance keys list` shows the used names")
    with plane.unix() as client:
        assert_error_shape(client.post("/keys", json={"name": "laptop"}), 409, "conflict")


def test_a_second_control_plane_refuses_and_the_first_keeps_answering(plane: Plane) -> None:
    before = control_socket(plane.state).stat().st_ino
    second = plane.cli("serve", "control")
    assert second.returncode == 10, second.stderr
    lines = second.stderr.splitlines()
    assert len(lines) == 2 and "another control plane (pid " in lines[0], second.stderr
    assert str(plane.state / "run" / "control.lock") in lines[0]
    assert lines[1].startswith("  hint: it is already running")
    assert control_socket(plane.state).stat().st_ino == before  # its socket was not replaced
    with plane.unix() as client:
        assert client.get("/status").status_code == 200


def test_anonymous_refusals_are_counted_not_flooded(plane: Plane) -> None:
    """Fifty anonymous refusals from one address: one record now, the rest in one record when
    the window closes. A known operator's refusals stay one record each."""
    viewer = operator_token(plane, "viewer-1", "viewer")
    with plane.tcp() as anonymous:
        for n in range(50):
            assert anonymous.put(f"/budgets/k{n}", json={}).status_code == 401
    now = [r for r in plane.requests() if r["actor"] == "anonymous"]
    assert len(now) == 1 and now[0]["refusals"] == 1 and now[0]["path"] == "/api/v1/budgets/k0"
    with plane.tcp(viewer) as client:
        for _ in range(3):
            assert client.put("/budgets/x", json={}).status_code == 403
    assert len([r for r in plane.requests() if r["actor"] == "viewer-1"]) == 3
    records = anonymous_refusals(plane, 50)
    assert len(records) == 2 and records[1]["refusals"] == 49
    assert records[1]["path"] == "/api/v1/budgets/k49"  # the latest one it stands for
    assert verify(plane.state / "audit" / "audit.jsonl").ok


@pytest.mark.parametrize("host", ["evil.example", "evil.example:80", "127.0.0.1.nip.io", ""])
def test_a_host_header_not_naming_loopback_is_refused(plane: Plane, host: str) -> None:
    """DNS rebinding: a page whose name now resolves to 127.0.0.1 still sends its own name."""
    with plane.tcp() as client:
        answer = client.get("/status", headers={"Host": host})
        assert_error_shape(answer, 421, "invalid_request")
        for loopback in (f"127.0.0.1:{plane.port}", f"localhost:{plane.port}", "localhost"):
            assert client.get("/status", headers={"Host": loopback}).status_code == 401
    assert not [r for r in plane.requests() if r["status"] == 421]
