"""Two answers of the sandbox lifecycle that the API and the CLI pass on:

- `kill NAME` of a name no sandbox has is NotFound (HTTP 404, exit 5), not a generic error; a
  real failure to stop one it found stays SandboxError (exit 1);
- `policy set` of the policy already in force is idempotent: the same revision, no new one, no
  reload (a PUT the operator repeats changes nothing)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from appliance.errors import exit_code_for
from sandbox.lifecycle.errors import SandboxError, SandboxNotFound
from sandbox.lifecycle.kill import SandboxKillSwitch
from sandbox.lifecycle.manager import SandboxManager
from sandbox.policy import parse_policy

POLICY = Path(__file__).resolve().parents[2] / "sandbox" / "policies" / "default.yaml"


class _Boxes:
    def get(self, name: str) -> None:
        return None

    def hold(self, reason: str) -> None:  # pragma: no cover - not asked to hold here
        raise AssertionError


class _Switch(SandboxKillSwitch):
    def __init__(self) -> None:
        self.boxes = _Boxes()  # type: ignore[assignment]
        self.audited: list[dict[str, Any]] = []

    def store_audit(self, event: str, **fields: Any) -> None:
        self.audited.append({"event": event, **fields})


def test_killing_an_unknown_name_is_not_found_exit_5() -> None:
    switch = _Switch()
    with pytest.raises(SandboxNotFound, match="no-such-box: no such sandbox") as info:
        switch.kill(["no-such-box"], hold=False, reason="r")
    assert exit_code_for(info.value) == 5 and info.value.hint == "`appliance sandbox list`"
    assert switch.audited[0]["failed"] == ["no-such-box: no such sandbox"]  # still audited


def test_setting_the_policy_in_force_again_is_the_same_revision() -> None:
    current = parse_policy(POLICY.read_text(), "default.yaml")
    applied: list[object] = []

    class _Manager:
        def policy(self, name: str) -> tuple[int, object]:
            return 4, current

        def apply_network(self, name: str, network: object, reason: str) -> int:
            applied.append(network)
            return 5

    again = parse_policy(POLICY.read_text(), "again.yaml")
    assert SandboxManager.set_policy(_Manager(), "box", again) == 4  # type: ignore[arg-type]
    assert applied == []  # no new revision, no reload
    text = yaml.safe_load(POLICY.read_text())
    text["network"]["allow"] = [{"host": "example.com", "ports": [443]}]
    changed = parse_policy(yaml.safe_dump(text), "changed.yaml")
    assert SandboxManager.set_policy(_Manager(), "box", changed) == 5  # type: ignore[arg-type]
    assert len(applied) == 1


def test_a_stop_that_fails_stays_a_sandbox_error() -> None:
    class _Found(_Boxes):
        def get(self, name: str) -> Any:
            from types import SimpleNamespace

            return SimpleNamespace(name=name, container_id="c1") if name == "box" else None

        def set_state(self, name: str, state: str) -> None:
            states.append((name, state))

    states: list[tuple[str, str]] = []

    switch = _Switch()
    switch.boxes = _Found()  # type: ignore[assignment]
    switch._stop_containers = lambda ids: ["podman said no"]  # type: ignore[method-assign]
    switch.paths = lambda name: None  # type: ignore[method-assign,assignment,return-value]
    switch._stop_proxy = lambda paths: None  # type: ignore[method-assign]
    with pytest.raises(SandboxError, match="box: podman said no") as info:
        switch.kill(["box", "ghost"], hold=False, reason="r")
    assert not isinstance(info.value, SandboxNotFound) and exit_code_for(info.value) == 1
    # The desired state is recorded before the stop (so a reconcile meanwhile leaves it down),
    # and a failed stop does not undo it: reconcile stops a `stopped` sandbox it finds running.
    assert states == [("box", "stopped")]
