"""Shared fixtures: every test gets its own state dir and config layers, never the real ones."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures"


@pytest.fixture(autouse=True)
def isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point every config layer and the state dir into tmp_path."""
    for name in list(__import__("os").environ):
        if name.startswith("APPLIANCE_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("APPLIANCE_SYSTEM_CONFIG", str(tmp_path / "etc" / "appliance.yaml"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("APPLIANCE_STATE_DIR", str(tmp_path / "state"))
    return tmp_path
