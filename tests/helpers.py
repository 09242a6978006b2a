"""What tests of every kind share: a free port, golden files, a CLI subprocess's environment."""

from __future__ import annotations

import os
import socket
from pathlib import Path

TESTS = Path(__file__).resolve().parent
GOLDEN = TESTS / "golden"
# UPDATE_GOLDEN=1 rewrites every golden file a test compares to; then read the diff.
UPDATE_GOLDEN = os.environ.get("UPDATE_GOLDEN") == "1"
# Read at import: the autouse isolated_env fixture strips APPLIANCE_* from the environment.
SERVICE_USER = os.environ.get("APPLIANCE_SANDBOX_USER", "appliance")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (closed again: connections to it are
    refused until someone binds it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def assert_golden(golden: Path, actual: str) -> None:
    """`actual` is the golden file's text; with UPDATE_GOLDEN=1 the file is written first."""
    if UPDATE_GOLDEN:
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(actual, encoding="utf-8")
    name = golden.relative_to(GOLDEN) if golden.is_relative_to(GOLDEN) else golden
    assert golden.exists(), f"no golden file {name}: run with UPDATE_GOLDEN=1 and review it"
    expected = golden.read_text(encoding="utf-8")
    assert actual == expected, f"{name} changed: rerun with UPDATE_GOLDEN=1 and review the diff"


def cli_env(state_dir: Path, scratch: Path, **settings: str) -> dict[str, str]:
    """The environment for an `appliance` subprocess: this state dir, no real config layers
    (the system config and XDG_CONFIG_HOME point under `scratch`), the tests' sandbox service
    user, and no control-plane TCP port (parallel tests would race for the default one).
    `settings` add or override variables (e.g. APPLIANCE_GATEWAY__PORT="8123")."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    env.update(
        APPLIANCE_STATE_DIR=str(state_dir),
        APPLIANCE_SYSTEM_CONFIG=str(scratch / "no-system-config.yaml"),
        APPLIANCE_SANDBOX__SERVICE_USER=SERVICE_USER,
        APPLIANCE_CONTROL__PORT="null",
        XDG_CONFIG_HOME=str(scratch / "xdg"),
    )
    env.update(settings)
    return env
