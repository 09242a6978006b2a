"""A runtime service's host side without Podman: the sandbox.json keys, the refusals before
anything is written, the token files (owner, mode, freshness, undone by a failed create) and
check-ins (atomic under concurrency). tests/integration/test_sandbox_runtime.py runs them for real.
"""

from __future__ import annotations

import json
import os
import stat
import threading
import time
from pathlib import Path

import pytest

from sandbox.lifecycle.errors import SandboxError
from sandbox.lifecycle.layout import SandboxPaths
from sandbox.lifecycle.ports import RuntimeService
from sandbox.lifecycle.runtime import (
    check_service,
    prepare_service,
    service_config,
    write_checkin,
)
from sandbox.lifecycle.undo import Undo
from sandbox.policy import Policy

LISTEN = Policy.model_validate({"process": {"listen": [18789]}})
# Root (the control plane) hands the env file to the agent's mapped uid; anyone else to itself.
AGENT = (100999, 100999) if os.geteuid() == 0 else (os.getuid(), os.getgid())


@pytest.fixture
def paths(tmp_path: Path) -> SandboxPaths:
    p = SandboxPaths(root=tmp_path / "boxes" / "a1", private=tmp_path / "state" / "a1")
    for d in (p.root, p.config, p.private):
        d.mkdir(parents=True, exist_ok=True)
    return p


def test_service_config_is_the_contract() -> None:
    keys = service_config(
        RuntimeService(port=18789, token_env="OPENCLAW_GATEWAY_TOKEN", fail_closed_after=120)
    )
    assert keys == {
        "runtime": {
            "restart": "always",
            "backoff_initial_s": 1,
            "backoff_max_s": 60,
            "healthy_after_s": 60,
        },
        "agent_socket": {"path": "/run/appliance/sock/agent.sock", "port": 18789},
        "checkin": {"path": "/run/appliance/config/checkin", "after_s": 120},
        "runtime_env_file": "/run/appliance/config/runtime-env.json",
    }


def test_service_config_leaves_out_what_is_not_asked() -> None:
    keys = service_config(RuntimeService(restart=False, fail_closed_after=0))
    assert set(keys) == {"runtime", "checkin"}
    assert keys["runtime"]["restart"] == "never" and keys["checkin"]["after_s"] == 0


def test_a_port_outside_listen_is_refused() -> None:
    with pytest.raises(SandboxError, match=r"8080 is not in the policy's process.listen") as err:
        check_service(RuntimeService(port=8080), LISTEN)
    assert "listen: [8080]" in (err.value.hint or "")
    with pytest.raises(SandboxError, match=r"process\.listen"):
        check_service(RuntimeService(port=18789), Policy())  # no listen at all
    check_service(RuntimeService(port=18789), LISTEN)


@pytest.mark.parametrize(
    "token_env",
    ["", "lower", "9LIVES", "A=B", "TOKEN\nX", "PATH ", "A-B", "É", "A" * 65, "LD_PRELOAD;x"],
)
def test_hostile_token_env_is_refused(token_env: str) -> None:
    with pytest.raises(SandboxError, match="not an environment variable name"):
        check_service(RuntimeService(token_env=token_env), Policy())


@pytest.mark.parametrize("after", [-1, True, 1.5, "120", None])
def test_fail_closed_after_must_be_whole_seconds(after: object) -> None:
    with pytest.raises(SandboxError, match="fail_closed_after"):
        check_service(RuntimeService(fail_closed_after=after), Policy())  # type: ignore[arg-type]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_prepare_service_writes_a_fresh_token_in_two_places(paths: SandboxPaths) -> None:
    service = RuntimeService(port=18789, token_env="AGENT_TOKEN")
    tokens = []
    for _ in range(2):  # a re-create: a new token each time
        with Undo("t") as undo:
            prepare_service(undo, paths, service, AGENT)
            undo.commit()
        host = paths.runtime_token.read_text().strip()
        assert json.loads(paths.runtime_env.read_text()) == {"AGENT_TOKEN": host}
        assert len(host) >= 43  # token_urlsafe(32)
        tokens.append(host)
    assert tokens[0] != tokens[1]
    assert _mode(paths.runtime_token) == 0o600
    assert (paths.runtime_token.stat().st_uid, paths.runtime_token.stat().st_gid) == (
        os.geteuid(),
        os.getegid(),
    )
    assert _mode(paths.runtime_env) == 0o400
    assert (paths.runtime_env.stat().st_uid, paths.runtime_env.stat().st_gid) == AGENT
    assert paths.sock.is_dir() and _mode(paths.sock) == 0o700
    assert (paths.sock.stat().st_uid, paths.sock.stat().st_gid) == AGENT
    leftovers = [p.name for p in (*paths.config.iterdir(), *paths.private.iterdir())]
    assert sorted(leftovers) == ["runtime-env.json", "runtime-token"]  # no temp files


def test_no_token_env_no_token(paths: SandboxPaths) -> None:
    paths.runtime_token.write_text("stale\n")  # from an earlier create: never reused
    with Undo("t") as undo:
        prepare_service(undo, paths, RuntimeService(port=18789), AGENT)
        undo.commit()
    assert not paths.runtime_token.exists() and not paths.runtime_env.exists()
    assert paths.sock.is_dir()


def test_a_failed_create_undoes_the_service_files(paths: SandboxPaths) -> None:
    with pytest.raises(RuntimeError, match="later step"), Undo("t") as undo:
        prepare_service(undo, paths, RuntimeService(port=18789, token_env="T"), AGENT)
        write_checkin(paths)
        raise RuntimeError("a later step failed")
    for gone in (paths.sock, paths.runtime_env, paths.checkin, paths.runtime_token):
        assert not gone.exists(), gone
    assert paths.config.is_dir() and paths.private.is_dir()  # not the service's to remove


def test_checkin_is_atomic_under_concurrency(paths: SandboxPaths) -> None:
    write_checkin(paths)
    first = paths.checkin.stat().st_mtime_ns
    seen: list[str] = []
    errors: list[BaseException] = []
    done = threading.Event()

    def reader() -> None:  # what PID 1 sees: always a whole file, never a missing one
        while not done.is_set():
            try:
                seen.append(paths.checkin.read_text())
            except BaseException as exc:  # any failure is the finding
                errors.append(exc)

    def writer() -> None:
        try:
            for _ in range(100):
                write_checkin(paths)
        except BaseException as exc:
            errors.append(exc)

    time.sleep(0.01)  # a coarse clock must still see the mtime move
    threads = [threading.Thread(target=writer) for _ in range(6)]
    watcher = threading.Thread(target=reader)
    watcher.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    watcher.join()
    assert errors == []
    assert seen and all(s.endswith("Z\n") and len(s) == 21 for s in seen)
    assert paths.checkin.stat().st_mtime_ns > first
    assert _mode(paths.checkin) == 0o644
    assert [p.name for p in paths.config.iterdir()] == ["checkin"]  # no temp file left
