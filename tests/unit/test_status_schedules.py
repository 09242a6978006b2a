"""`appliance status` shows each agent's next and last scheduled run from the store (read-only,
with nothing running): the soonest next run, the latest run with its outcome and the latest skip
with its reason, over its entries (a skip does not hide the run before it)."""

from __future__ import annotations

import os
import pwd
import time
from pathlib import Path

from rich.console import Console

from appliance.cli.status import _agent_lines
from appliance.config import ApplianceConfig, SandboxConfig
from appliance.ops.status import agents_section
from appliance.store import open_store
from appliance.store.agent_store import AgentStore
from appliance.store.schedule_store import ScheduleStore
from hardware.snapshot import HostSnapshot
from tests.conftest import FIXTURES

HOST = HostSnapshot.model_validate_json((FIXTURES / "hosts" / "h100_80gb_x1.json").read_text())
ME = pwd.getpwuid(os.geteuid()).pw_name


def test_status_shows_next_and_last_scheduled_runs(tmp_path: Path) -> None:
    config = ApplianceConfig(state_dir=tmp_path / "s", sandbox=SandboxConfig(service_user=ME))
    with open_store(config.state_dir) as store:
        for agent in ("a1", "a2"):
            AgentStore(store).deploy(agent, "bp", "1.0.0", "sha256:x", "img", "create")
    schedules = ScheduleStore(config.state_dir)
    schedules.planned("a1", "k0", 0, 2_000_000_060.0)
    schedules.planned("a1", "k1", 1, 2_000_000_030.0)  # the soonest of the two
    schedules.started("a1", "k0", 2_000_000_000.0)
    schedules.finished("a1", "k0", 2_000_000_000.0, "ok", None)
    schedules.skipped("a1", "k1", 2_000_000_010.0, "a1 is held by the kill switch: drill")
    schedules.skipped("a1", "k0", 2_000_000_005.0, "outside active hours (09:00-18:00 UTC)")
    section = agents_section(config, HOST)
    assert section["error"] is None
    rows = {r["name"]: r for r in section["agents"]}
    assert rows["a2"]["schedule"] is None  # no schedule
    assert rows["a1"]["schedule"] == {
        "entries": 2,
        "next_run_at": 2_000_000_030.0,
        "last_run_at": 2_000_000_000.0,
        "last_outcome": "ok",
        "last_reason": None,
        "last_skip_at": 2_000_000_010.0,
        "last_skip_reason": "a1 is held by the kill switch: drill",
    }
    console = Console(width=200, record=True)
    for line in _agent_lines(section):
        console.print(line)
    text = console.export_text()
    assert "schedule  2 entries  next " in text
    last = time.strftime("%H:%M:%S", time.localtime(2_000_000_000.0))
    skipped = time.strftime("%H:%M:%S", time.localtime(2_000_000_010.0))
    assert f"last {last} ok  skipped {skipped} (a1 is held by the kill switch: drill)" in text
