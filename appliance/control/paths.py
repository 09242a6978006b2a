"""Where the control plane's files are: light (no FastAPI, no store), so the supervisor, the
status reader and the CLI's client can find the socket without importing the plane."""

from __future__ import annotations

from pathlib import Path

from appliance.config import ApplianceConfig


def run_dir(config: ApplianceConfig) -> Path:
    return config.state_dir / "run"


def socket_path(config: ApplianceConfig) -> Path:
    """The API's unix socket (mode 0660, group appliance-admin when it exists)."""
    return run_dir(config) / "control.sock"


def lock_path(config: ApplianceConfig) -> Path:
    """Held (flock) by the one `appliance serve control` of this state dir for its lifetime."""
    return run_dir(config) / "control.lock"
