"""The sandbox lifecycle behind its ports: `sandbox` imports nothing of `appliance` (or
`inference`), its errors keep the CLI's exit codes and the API's statuses, and the appliance's
implementations of the ports (appliance/control/wiring.py) do what the manager did itself."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from appliance.config import load_config
from appliance.control.api import errors as api_errors
from appliance.control.wiring import StoreAudit, StoreKeys, sandbox_manager
from appliance.errors import ConfigError, exit_code_for
from appliance.store import open_store
from appliance.store.inference_store import InferenceStore
from appliance.store.names import KeyNameError
from sandbox.lifecycle import errors as lifecycle_errors
from sandbox.names import InvalidNameError

LIFECYCLE_MODULES = [
    "sandbox.lifecycle.create",
    "sandbox.lifecycle.errors",
    "sandbox.lifecycle.exec",
    "sandbox.lifecycle.kill",
    "sandbox.lifecycle.layout",
    "sandbox.lifecycle.manager",
    "sandbox.lifecycle.owned_paths",
    "sandbox.lifecycle.podman_service",
    "sandbox.lifecycle.ports",
    "sandbox.lifecycle.proxy_launch",
    "sandbox.lifecycle.reconcile",
    "sandbox.lifecycle.undo",
    "sandbox.names",
    "sandbox.proxy.monitor",
]


def test_the_lifecycle_imports_nothing_of_appliance_or_inference() -> None:
    code = (
        "import importlib, sys\n"
        f"for m in {LIFECYCLE_MODULES!r}: importlib.import_module(m)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('appliance', 'inference')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# (error, CLI exit code, HTTP status, the API's error type): the codes the CLI had before the move
MAPPED = [
    (lifecycle_errors.SandboxError("x"), 1, 400, "invalid_request"),
    (lifecycle_errors.SandboxNotFound("x"), 5, 404, "not_found"),
    (lifecycle_errors.SandboxConflict("x"), 10, 409, "conflict"),
    (lifecycle_errors.HostNotReady("x"), 6, 412, "preflight_failed"),
    (lifecycle_errors.PodmanUnavailable("x"), 7, 503, "backend_unavailable"),
    (lifecycle_errors.PolicyFileError("x"), 3, 422, "config_error"),
    (InvalidNameError("x"), 3, 422, "config_error"),
    (KeyNameError("x"), 3, 422, "config_error"),
]


@pytest.mark.parametrize(("error", "code", "status", "type_"), MAPPED, ids=lambda v: str(v))
def test_each_lifecycle_error_keeps_its_exit_code_and_status(
    error: Exception, code: int, status: int, type_: str
) -> None:
    assert exit_code_for(error) == code
    assert api_errors.for_exception(error) == (status, type_)


def test_a_key_name_error_is_still_a_config_error_and_a_name_error() -> None:
    error = KeyNameError("bad")
    assert isinstance(error, ConfigError) and isinstance(error, InvalidNameError)
    assert "key names are" in (error.hint or "")


def test_the_api_answers_a_lifecycle_error_in_the_one_json_shape() -> None:
    app = FastAPI()
    api_errors.install(app)

    @app.get("/held")
    def held() -> None:
        raise lifecycle_errors.SandboxConflict(
            "sandboxes are held by the kill switch: incident", hint="`appliance release`"
        )

    response = TestClient(app).get("/held")
    assert response.status_code == 409
    assert response.json() == {
        "error": {
            "message": "sandboxes are held by the kill switch: incident",
            "type": "conflict",
            "code": None,
            "hint": "`appliance release`",
        }
    }


def test_the_manager_refuses_an_unknown_name_and_a_hold_before_touching_podman(
    tmp_path: Path,
) -> None:
    config = load_config({"state_dir": str(tmp_path / "state")})
    with open_store(config.state_dir) as store:
        manager = sandbox_manager(config, store)
        with pytest.raises(lifecycle_errors.SandboxNotFound) as info:
            manager.record("web")
        assert exit_code_for(info.value) == 5 and info.value.hint == "`appliance sandbox list`"
        manager.boxes.hold("incident 7")
        with pytest.raises(lifecycle_errors.SandboxConflict, match="incident 7") as held:
            manager.start("web")
        assert exit_code_for(held.value) == 10 and "release" in (held.value.hint or "")


def test_store_keys_issue_a_fresh_key_per_name_and_revoke_and_discard(tmp_path: Path) -> None:
    state = tmp_path / "state"
    open_store(state).close()
    keys = StoreKeys(state)
    first_id, first_secret = keys.issue("sandbox-web", ["m1"])
    second_id, second_secret = keys.issue("sandbox-web", None)  # a re-created sandbox's key
    assert first_id != second_id and first_secret != second_secret
    with InferenceStore(state) as inference:
        live = {k.id: k for k in inference.list_keys(include_revoked=False)}
    assert second_id in live and first_id not in live  # the old one was revoked
    keys.revoke(second_id)
    third_id, _ = keys.issue("sandbox-other", None)
    keys.discard(third_id)
    with InferenceStore(state) as inference:
        assert {k.id for k in inference.list_keys(include_revoked=False)} == set()


def test_store_audit_appends_to_the_hash_chained_log(tmp_path: Path) -> None:
    from appliance.audit import audit_path, verify

    state = tmp_path / "state"
    open_store(state).close()
    StoreAudit(state).audit("sandbox.create", sandbox="web", policy_rev=1)
    records = [r for r in audit_path(state).read_text().splitlines() if "sandbox.create" in r]
    assert len(records) == 1 and '"sandbox":"web"' in records[0].replace(" ", "")
    assert verify(audit_path(state)).ok
