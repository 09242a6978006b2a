"""`appliance sandbox exec` builds its `podman --remote exec -i` argv from SandboxManager's public
methods only (it once reached into `_record` and `_client` from outside the class)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from appliance.errors import NotFoundError
from sandbox.compile.podman_spec import SUPERVISOR_ENTRYPOINT
from sandbox.lifecycle.exec import exec_argv
from sandbox.policy import Policy


class _PublicOnly:
    """SandboxManager's public surface that exec needs, and nothing private."""

    def __init__(self) -> None:
        self.podman = SimpleNamespace(podman="/usr/bin/podman", base_url="unix:///run/p.sock")
        self.service_checked = False

    def record(self, name: str) -> Any:
        if name != "web":
            raise NotFoundError(f"no sandbox named {name!r}", hint="`appliance sandbox list`")
        return SimpleNamespace(name=name, container_id="c0ffee")

    def policy(self, name: str) -> tuple[int, Policy]:
        return 1, Policy()

    def require_service(self) -> None:
        self.service_checked = True


def test_exec_argv_uses_the_public_methods() -> None:
    m = _PublicOnly()
    argv = exec_argv(m, "web", ["python3", "-"])  # type: ignore[arg-type]
    uid, gid = Policy().process.uid, Policy().process.gid
    assert argv == [
        "/usr/bin/podman", "--remote", "--url", "unix:///run/p.sock",
        "exec", "-i", "--user", f"{uid}:{gid}", "c0ffee",
        *SUPERVISOR_ENTRYPOINT, "exec", "--", "python3", "-",
    ]  # fmt: skip
    assert m.service_checked


def test_exec_argv_of_an_unknown_sandbox_is_not_found_with_a_hint() -> None:
    with pytest.raises(NotFoundError) as info:
        exec_argv(_PublicOnly(), "nosuch", ["true"])  # type: ignore[arg-type]
    assert info.value.hint


def test_the_manager_has_those_public_methods() -> None:
    from sandbox.lifecycle.manager import SandboxManager

    for name in ("record", "policy", "require_service"):
        assert callable(getattr(SandboxManager, name, None)), name
