"""What an operator's `approvals approve --persist` may write: one concrete public host, one
port (sandbox/proxy/approvals.py `approval_endpoint`), checked by the control plane before it
approves anything (sandbox/lifecycle/manager.py `persistable`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sandbox.policy import Endpoint

REFUSED = [
    ("*.com", 443, "wildcard"),  # every .com host
    ("*.example.com", 443, "wildcard"),
    ("10.0.0.1", 443, "private"),
    ("127.0.0.1", 80, "private"),
    ("169.254.169.254", 80, "private"),  # cloud metadata
    ("192.168.1.10", 443, "private"),
    ("100.64.0.1", 443, "private"),  # shared address space: not global
    ("127.1", 80, "numeric"),  # shorthands the resolver reads as addresses
    ("2130706433", 80, "numeric"),
    ("", 443, "host"),
    ("a b", 443, "host"),
    ("api.example.com", 0, "port"),
    ("api.example.com", 70000, "port"),
    ("api.example.com", "443", "port"),  # a port is a number, not text
]


@pytest.mark.parametrize(("host", "port", "why"), REFUSED)
def test_wide_or_private_approvals_are_refused(host: str, port: int, why: str) -> None:
    from sandbox.proxy.approvals import approval_endpoint

    with pytest.raises(ValueError, match=why):
        approval_endpoint(host, port)


@pytest.mark.parametrize(("host", "port"), [("pypi.org", 443), ("8.8.8.8", 53), ("API.x.io", 80)])
def test_one_public_host_and_port_is_accepted(host: str, port: int) -> None:
    from sandbox.proxy.approvals import approval_endpoint

    assert approval_endpoint(host, port) == Endpoint(host=host.lower(), ports=[port])


@pytest.mark.parametrize(("host", "port", "why"), REFUSED[:3])
def test_the_control_plane_refuses_before_anything_is_approved_or_written(
    tmp_path: Path, host: str, port: int, why: str
) -> None:
    from appliance.config import load_config
    from appliance.control.wiring import sandbox_manager
    from appliance.store import open_store
    from sandbox.lifecycle.errors import SandboxError

    config = load_config({"state_dir": str(tmp_path / "state")})
    with open_store(config.state_dir) as store:
        m = sandbox_manager(config, store)
        with pytest.raises(SandboxError) as info:
            m.persistable("a1", host, port)
        assert why in str(info.value) and info.value.hint
        assert "\\n" not in str(info.value)
        assert m.boxes.revisions("web") == []
