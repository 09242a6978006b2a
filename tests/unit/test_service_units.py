"""systemd units: golden files, and what a unit must and must not say.

UPDATE_GOLDEN=1 pytest tests/unit/test_service_units.py
"""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.services.systemd import UNITS, render_all
from tests.helpers import assert_golden

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "units"
RENDERED = render_all(
    executable="/opt/appliance/venv/bin/appliance",
    state_dir=Path("/var/lib/appliance"),
)


@pytest.mark.parametrize("name", sorted(RENDERED))
def test_unit_matches_its_golden_file(name: str) -> None:
    assert_golden(GOLDEN / name, RENDERED[name])


def test_units_cover_the_services_and_order_them() -> None:
    assert sorted(RENDERED) == [
        "appliance-backend.service",
        "appliance-control.service",
        "appliance-gateway.service",
    ]
    gateway = RENDERED["appliance-gateway.service"]
    after = "After=network-online.target appliance-backend.service appliance-control.service"
    assert after in gateway
    control = RENDERED["appliance-control.service"]
    assert "--state-dir /var/lib/appliance serve control\n" in control
    assert "ExecStart=/opt/appliance/venv/bin/appliance --state-dir /var/lib/appliance " in gateway


def test_units_that_may_start_podman_keep_setuid_helpers_working() -> None:
    # newuidmap is setuid: NoNewPrivileges=yes would break rootless Podman in these units.
    assert "NoNewPrivileges=no" in RENDERED["appliance-control.service"]
    assert "NoNewPrivileges=no" in RENDERED["appliance-gateway.service"]
    assert "NoNewPrivileges=yes" in RENDERED["appliance-backend.service"]
    assert all(u.command.startswith("serve ") for u in UNITS)
