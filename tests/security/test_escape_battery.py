"""The escape battery: many named attempts from inside a real sandbox; every one must fail.

Real rootless Podman, the real supervisor (Landlock), the real seccomp profile and egress proxy.
The probe runs as the agent command and prints one JSON line; this test reads it from the logs.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

import pytest

from appliance.config import load_config
from appliance.errors import NotFoundError
from appliance.sandboxes import SandboxManager, read_policy_file
from appliance.store import open_store
from tests.sandbox_fixtures import ensure_base_image, sandbox_skip_reason

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PROBE = Path(__file__).with_name("probe.py")
POLICIES = Path(__file__).resolve().parents[2] / "sandbox" / "policies"


@pytest.fixture(scope="module")
def manager(tmp_path_factory: pytest.TempPathFactory):
    if (why := sandbox_skip_reason()) is not None:
        pytest.skip(why)
    ensure_base_image()
    state = tmp_path_factory.mktemp("state")
    config = load_config({"state_dir": str(state)})
    with open_store(state) as store:
        yield SandboxManager(config, store)


MEMORY = 256 * 1024**2  # small caps keep the bombs quick
PIDS = 48


def run_probe(manager: SandboxManager, name: str) -> dict:
    policy = read_policy_file(POLICIES / "default.yaml")
    deny_all = policy.network.model_copy(
        update={"approval": policy.network.approval.model_copy(update={"mode": "deny"})}
    )
    policy = policy.with_network(deny_all)
    policy = policy.model_copy(
        update={"resources": policy.resources.model_copy(update={"memory": MEMORY, "pids": PIDS})}
    )
    limits = {"memory": MEMORY, "pids": PIDS, "gateway_port": manager.config.gateway.port}
    source = f"LIMITS = {limits!r}\n" + PROBE.read_text()
    try:
        manager.create(name, policy, ["python3", "-I", "-c", source])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            logs = b"".join(manager.container(name).logs(stdout=True, stderr=True)).decode()
            for line in logs.splitlines():
                if line.startswith("PROBE "):
                    return {"report": manager.enforcement(name), **json.loads(line[6:])}
            time.sleep(0.2)
        raise AssertionError(f"no probe output:\n{logs}")
    finally:
        with contextlib.suppress(NotFoundError):  # create may fail before it records anything
            manager.remove(name)


@pytest.fixture(scope="module")
def probe(manager: SandboxManager) -> dict:
    # Once for both tests: two fork bombs back to back in one user namespace (RLIMIT_NPROC is
    # counted per uid across sandboxes) made the second sandbox's start race the first's exit.
    return run_probe(manager, f"battery-{os.getpid()}")


def test_every_escape_attempt_fails(probe: dict) -> None:
    results = probe["results"]
    escaped = {k: v for k, v in results.items() if not v.startswith("blocked")}
    assert not escaped, escaped
    assert len(results) >= 40, sorted(results)


def test_posture_inside_the_sandbox(probe: dict) -> None:
    posture, report = probe["posture"], probe["report"]
    assert posture["uid"] == 1000
    assert posture["no_new_privs"] == "1"
    assert posture["seccomp"] == "2"
    assert int(posture["cap_eff"], 16) == 0 and int(posture["cap_bnd"], 16) == 0
    assert "/opt/appliance/supervisor/init.py" in posture["pid1"]
    assert report["landlock"]["enforced"] is True and report["landlock"]["abi"] >= 1
    assert report["agent_started"] is True and report["seccomp_mode"] == 2
    # Every sandbox has per-process caps, whatever the host's cgroup version allows.
    assert report["limits"]["rlimit_data"] == MEMORY
    assert report["limits"]["rlimit_nproc"] == PIDS
