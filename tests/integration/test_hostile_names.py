"""Hostile names and failed creates, on real Podman, as root, through the installed CLI.

A name that breaks the rule (a-z, 0-9, '-', 1-63) gets one error line and a hint, exit 2 or 3,
and leaves nothing: the state dir's tree and the store's rows are as before, nothing appears in
the service user's home, no proxy runs. `sandbox rm ''` never removes another sandbox. A create
that fails late (the image is missing; the container dies at start) removes everything it made:
directories, record, policy revision, key, proxy, container; a home kept by `rm --keep-home`
stays.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.control_fixtures import running_control_plane
from tests.helpers import cli_env
from tests.sandbox_fixtures import (
    ensure_base_image,
    podman_client,
    proxy_pids,
    run_cli,
    sandbox_skip_reason,
    service_home,
)
from tests.unit.test_names import HOSTILE

pytestmark = [pytest.mark.integration, pytest.mark.slow]

POLICY = Path(__file__).resolve().parents[2] / "sandbox" / "policies" / "default.yaml"
# Left out of the tree comparisons after a failed create: the audit log records the failure, and
# the store's files change size as the control plane's open connections write and checkpoint
# (their contents are compared row by row instead, by _rows).
VOLATILE = ("audit", "appliance.db", "appliance.db-wal", "appliance.db-shm")
TAG = f"h1x{os.getpid()}"  # in every hostile name that can carry it: leftovers are findable


def hostile_names() -> dict[str, str]:
    """HOSTILE with this run's tag where the shape allows (NUL cannot travel in argv)."""
    names = {k: v for k, v in HOSTILE.items() if k != "nul"}
    names.update(
        {
            "parent": f"../{TAG}",
            "parent-deep": f"../../{TAG}",
            "slash": f"{TAG}/b",
            "space": f"{TAG} b",
            "newline": f"{TAG}\nb",
            "trailing-newline": f"{TAG}\n",
            "300-chars": TAG + "a" * 300,
            "cyrillic-a": "\u0430" + TAG,
            "uppercase": TAG.upper(),
        }
    )
    return names


@pytest.fixture
def env() -> Iterator[dict[str, str]]:
    if (why := sandbox_skip_reason()) is not None:
        pytest.skip(why)
    ensure_base_image()
    scratch = Path(tempfile.mkdtemp(prefix="hn-"))  # short: unix socket paths live under it
    scratch.chmod(0o755)
    environ = cli_env(scratch / "s", scratch)
    environ["TAG"] = TAG
    try:
        # The CLI's changes go through a control plane on this state dir (its log lands in
        # `scratch`, beside the state dir: the trees compared below are the state dir's).
        with running_control_plane(environ, scratch / "s"):
            try:
                yield environ
            finally:
                state = Path(environ["APPLIANCE_STATE_DIR"])
                for name in _store_names(state):
                    run_cli("sandbox", "rm", name, env=environ)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _state(env: dict[str, str]) -> Path:
    return Path(env["APPLIANCE_STATE_DIR"])


def _tree(root: Path, skip: tuple[str, ...] = ()) -> dict[str, int]:
    """Every path under root (but the top-level names in `skip`): size, or -1 for a dir."""
    out: dict[str, int] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        if dirpath == str(root):
            dirnames[:] = [d for d in dirnames if d not in skip]
            filenames = [f for f in filenames if f not in skip]
        rel = os.path.relpath(dirpath, root)
        for d in dirnames:
            out[os.path.normpath(os.path.join(rel, d))] = -1
        for f in filenames:
            p = os.path.join(dirpath, f)
            out[os.path.normpath(os.path.join(rel, f))] = os.lstat(p).st_size
    return out


def _rows(state: Path) -> dict[str, list[tuple]]:
    with contextlib.closing(sqlite3.connect(state / "appliance.db")) as db:
        return {
            "sandboxes": db.execute("SELECT name, state FROM sandboxes").fetchall(),
            "revisions": db.execute("SELECT sandbox, rev FROM policy_revisions").fetchall(),
            "keys": db.execute("SELECT name, revoked_at FROM api_keys").fetchall(),
            "budgets": db.execute("SELECT key_id FROM budgets").fetchall(),
            "agents": db.execute("SELECT agent, outcome FROM agent_deployments").fetchall(),
        }


def _store_names(state: Path) -> list[str]:
    if not (state / "appliance.db").exists():
        return []
    return [r[0] for r in _rows(state)["sandboxes"]]


def _leftovers(home: Path) -> list[str]:
    """Anything named with this run's tag in the service home (and one level above it)."""
    found = []
    for top in (home, home.parent / "homes"):
        if not top.exists():
            continue
        for dirpath, dirnames, filenames in os.walk(top):
            if dirpath.count(os.sep) - str(top).count(os.sep) > 3:
                dirnames[:] = []
            found += [os.path.join(dirpath, n) for n in dirnames + filenames if TAG in n]
    return found + [str(p) for p in (home.parent / TAG, home.parent / "supervisor") if p.exists()]


def _assert_one_line_error(proc, what: str) -> None:
    assert proc.returncode in (2, 3), (what, proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr and proc.stdout == "", proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 2, (what, lines)
    assert lines[0].startswith("appliance: error: invalid "), (what, lines)
    assert lines[1].startswith("  hint: ") and len(lines[1]) > len("  hint: "), (what, lines)


@pytest.mark.parametrize("case", sorted(hostile_names()))
def test_hostile_names_are_refused_and_leave_nothing(env: dict[str, str], case: str) -> None:
    state, home = _state(env), service_home()
    assert home is not None
    assert run_cli("keys", "list", env=env).returncode == 0  # the store exists
    shared = home / "sandboxes"
    before, rows = _tree(state), _rows(state)
    name = hostile_names()[case]
    for argv in (
        ["sandbox", "create", "--policy", str(POLICY), "--", name],
        ["agent", "create", "--blueprint", "shell", "--", name],
        ["keys", "create", "--", name],
    ):
        _assert_one_line_error(run_cli(*argv, env=env), f"{case}: {argv[:2]}")
    assert _tree(state) == before
    assert _rows(state) == rows
    assert _leftovers(home) == []
    # The nameless and '.' sandboxes would have written into the shared directory itself
    # (other tests' sandboxes may come and go there meanwhile: only these names are checked).
    if shared.exists():
        assert not {"egress", "config", "report", "seccomp.json"} & set(os.listdir(shared))
    assert not (home.parent / "homes" / "sandboxes").exists()
    assert not proxy_pids(TAG, state)


def test_the_library_refuses_them_too_nul_included(env: dict[str, str]) -> None:
    """Every entry point, not only the CLI: SandboxManager, AgentManager, the key store."""
    from appliance.config import load_config
    from appliance.control.agent_manager import AgentManager
    from appliance.control.wiring import sandbox_manager
    from appliance.store import open_store
    from appliance.store.inference_store import InferenceStore
    from sandbox.lifecycle.manager import read_policy_file
    from sandbox.names import InvalidNameError

    state = _state(env)
    config = load_config({"state_dir": str(state)})
    policy = read_policy_file(POLICY)
    with open_store(state) as store:
        agents = AgentManager(config, store, sandbox_manager(config, store))
        before, rows = _tree(state), _rows(state)
        for case, name in sorted({**hostile_names(), "nul": f"{TAG}\x00b"}.items()):
            with pytest.raises(InvalidNameError):
                agents.sandboxes.create(name, policy, None)
            with pytest.raises(InvalidNameError):
                agents.create(name, "shell")
            with pytest.raises(InvalidNameError):
                InferenceStore(state).create_key(name, "client")
            if case not in ("empty", "dot"):  # a record from before the rule: see below
                with pytest.raises(InvalidNameError):
                    agents.sandboxes.remove(name)
        assert _tree(state) == before and _rows(state) == rows
    home = service_home()
    assert home is not None and _leftovers(home) == []


def test_rm_of_the_empty_name_removes_no_other_sandbox(env: dict[str, str]) -> None:
    """Before the rule, `rm ''` removed every labelled container (the empty label matched all)
    and would have deleted the shared directories."""
    state, home = _state(env), service_home()
    assert home is not None
    keep = f"h1-keep-{os.getpid()}"
    made = run_cli("sandbox", "create", keep, "--policy", str(POLICY), env=env)
    assert made.returncode == 0, made.stderr
    for name in ("", "."):
        proc = run_cli("sandbox", "rm", "--", name, env=env)
        assert proc.returncode in (2, 3), proc.stderr
        assert proc.stderr.startswith("appliance: error: invalid sandbox name"), proc.stderr
    # and a record with such a name (made by an older version) is refused, not followed: the
    # CLI cannot even address it (no URL names it), the manager refuses its paths
    with contextlib.closing(sqlite3.connect(state / "appliance.db")) as db, db:
        db.execute(
            "INSERT INTO sandboxes (name, image, command_json, state, created_at, updated_at) "
            "VALUES ('', 'x', '[]', 'stopped', 0, 0)"
        )
    proc = run_cli("sandbox", "rm", "--", "", env=env)
    assert proc.returncode in (2, 3), proc.stderr
    assert proc.stderr.startswith("appliance: error: invalid sandbox name"), proc.stderr
    assert proc.stderr.count("appliance: error:") == 1 and "  hint: " in proc.stderr
    from appliance.config import load_config
    from appliance.control.wiring import sandbox_manager
    from appliance.store import open_store
    from sandbox.lifecycle.owned_paths import UnsafePathError

    with open_store(state) as store, pytest.raises(UnsafePathError, match="not strictly inside"):
        sandbox_manager(load_config({"state_dir": str(state)}), store).remove("")
    # reconciliation reports that record and goes on with the others
    rec = run_cli("sandbox", "reconcile", "--json", env=env)
    assert rec.returncode == 0, rec.stderr
    out = json.loads(rec.stdout)
    assert out["running"] == [keep] and out["failed"][0].startswith("'': refusing"), out
    with contextlib.closing(sqlite3.connect(state / "appliance.db")) as db, db:
        db.execute("DELETE FROM sandboxes WHERE name = ''")
    listed = run_cli("sandbox", "list", "--json", env=env)
    assert f'"name": "{keep}"' in listed.stdout and '"container": "running"' in listed.stdout
    assert (home / "sandboxes" / keep / "egress" / "egress.sock").is_socket()
    assert (home / "sandboxes" / "supervisor").is_dir()
    assert (state / "sandboxes" / keep / "key").is_file()


def test_the_shared_supervisor_directory_is_no_sandboxs_to_remove(env: dict[str, str]) -> None:
    """`sandboxes/supervisor` is the PID-1 code every sandbox mounts read-only: `rm supervisor`
    (sandbox or agent) is refused and leaves it whole; every shared entry beside the sandboxes'
    own directories is a reserved name, so no sandbox can ever be created onto it."""
    from sandbox.names import SHARED_SANDBOX_DIRS

    home = service_home()
    assert home is not None
    keep = f"h1-sup-{os.getpid()}"
    made = run_cli("sandbox", "create", keep, "--policy", str(POLICY), env=env)
    assert made.returncode == 0, made.stderr
    shared = home / "sandboxes" / "supervisor"
    before = sorted(p.name for p in shared.iterdir())
    assert "init.py" in before
    proc = run_cli("sandbox", "rm", "supervisor", env=env)
    _assert_one_line_error(proc, "sandbox rm supervisor")
    assert "reserved" in proc.stderr, proc.stderr
    proc = run_cli("agent", "rm", "supervisor", env=env)  # no such agent: nothing to remove
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert sorted(p.name for p in shared.iterdir()) == before
    # A sandbox's own directory has an egress directory; anything else there is shared.
    entries = [p for p in (home / "sandboxes").iterdir() if not (p / "egress").is_dir()]
    assert {p.name for p in entries} <= SHARED_SANDBOX_DIRS, entries
    assert (home / "sandboxes" / keep / "egress").is_dir()


def _assert_nothing_left(env: dict[str, str], name: str, before: dict, rows: dict) -> None:
    state, home = _state(env), service_home()
    assert home is not None
    assert _tree(state, skip=VOLATILE) == before
    assert _rows(state) == rows  # no record, revision, key or budget
    assert not (home / "sandboxes" / name).exists()
    assert not (home / "homes" / name).exists()
    assert not proxy_pids(name, state)
    assert name not in {c.name for c in podman_client().containers.list(all=True)}


@pytest.mark.parametrize("fault", ["missing-image", "dies-at-start"])
def test_a_create_that_fails_late_leaves_nothing(env: dict[str, str], fault: str) -> None:
    state = _state(env)
    name = f"h1-{fault}-{os.getpid()}"
    assert run_cli("keys", "list", env=env).returncode == 0
    before, rows = _tree(state, skip=VOLATILE), _rows(state)
    policy, extra = POLICY, []
    if fault == "missing-image":  # fails at container create: after record, key, dirs, proxy
        extra = ["--image", f"localhost/h1-no-such-image-{os.getpid()}:latest"]
    else:  # the container is created and starts; the supervisor refuses (a required path
        # is absent under Landlock's hard requirement): the last step fails
        policy = state.parent / "refused.yaml"
        policy.write_text(
            POLICY.read_text().replace("  read_only: []", "  read_only: [/nonexistent]")
        )
    proc = run_cli("sandbox", "create", name, "--policy", str(policy), *extra, env=env)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("appliance: error: "), proc.stderr
    _assert_nothing_left(env, name, before, rows)
    # and the name is free again: a good create works
    ok = run_cli("sandbox", "create", name, "--policy", str(POLICY), env=env)
    assert ok.returncode == 0, ok.stderr


def test_a_failed_re_create_keeps_the_home_it_did_not_make(env: dict[str, str]) -> None:
    home = service_home()
    assert home is not None
    name = f"h1-keep-home-{os.getpid()}"
    assert run_cli("sandbox", "create", name, "--policy", str(POLICY), env=env).returncode == 0
    kept = home / "homes" / name
    wrote = run_cli("sandbox", "exec", name, "--", "sh", "-c", "echo mine > ~/f", env=env)
    assert wrote.returncode == 0, wrote.stderr
    assert run_cli("sandbox", "rm", name, "--keep-home", env=env).returncode == 0
    assert (kept / "f").read_text() == "mine\n"
    bad = ["--image", f"localhost/h1-no-such-image-{os.getpid()}:latest"]
    proc = run_cli("sandbox", "create", name, "--policy", str(POLICY), *bad, env=env)
    assert proc.returncode != 0
    assert (kept / "f").read_text() == "mine\n"  # not this call's to remove
    assert not (home / "sandboxes" / name).exists()
    shutil.rmtree(kept)


def test_an_agent_create_that_fails_late_leaves_nothing(env: dict[str, str]) -> None:
    """The agent's sandbox is made, started and refused (a required path is absent): no
    deployment, sandbox, revision, key, budget, directory, proxy or container remains."""
    import yaml

    from sandbox.images.base import recipe_digest

    state = _state(env)
    name = f"h1-agent-{os.getpid()}"
    bp = state.parent / "bp.yaml"
    bp.write_text(
        yaml.safe_dump(
            {
                "name": "refused",
                "version": "1.0.0",
                "runtime": {"kind": "command", "command": ["sleep", "infinity"]},
                "image": {"name": "localhost/appliance-base", "digest": recipe_digest()},
                "sandbox": {
                    "base": "default",
                    "additions": {"filesystem": {"read_only": ["/nonexistent"]}},
                },
                "budgets": {"daily_tokens": 1000},
            }
        )
    )
    assert run_cli("keys", "list", env=env).returncode == 0
    before, rows = _tree(state, skip=VOLATILE), _rows(state)
    proc = run_cli("agent", "create", name, "--blueprint", str(bp), env=env, timeout=300)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "appliance: error: " in proc.stderr and "refused to start" in proc.stderr
    _assert_nothing_left(env, name, before, rows)
