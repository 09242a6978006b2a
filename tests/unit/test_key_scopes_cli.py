"""`appliance keys create --scope`: an unknown scope (or any scope on a sandbox's key) is a usage
error, one line and a hint, exit 3, found before the store is opened."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.cli.main import main
from appliance.errors import ConfigError, exit_code_for
from appliance.store.names import KeyScopeError


@pytest.mark.parametrize(
    "argv",
    [
        ["keys", "create", "ops", "--scope", "admin"],
        ["keys", "create", "ops", "--scope", "metrics", "--scope", "root"],
        ["keys", "create", "agent-1", "--sandbox", "--scope", "metrics"],
    ],
)
def test_a_bad_scope_is_a_usage_error_before_the_store_is_opened(
    argv: list[str], isolated_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 3
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith("appliance: error: ") and "scope" in lines[0], lines
    assert lines[1].startswith("  hint: ") and "metrics" in lines[1], lines
    assert not (isolated_env / "state").exists()  # nothing opened, nothing written


def test_key_scope_error_is_a_config_error() -> None:
    error = KeyScopeError("unknown key scope 'admin'")
    assert isinstance(error, ConfigError) and exit_code_for(error) == 3
