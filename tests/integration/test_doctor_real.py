"""The doctor against this machine's real kernel, /proc, /etc and tools."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.config import ApplianceConfig
from appliance.ops.doctor import CHECKS, DoctorEnv, landlock_abi, run_checks
from hardware.snapshot import HostClass, HostSnapshot

pytestmark = pytest.mark.integration

CPU_HOST = HostSnapshot(
    host_class=HostClass.CPU_ONLY,
    cpu_count=1,
    memory_total_mib=1024,
    memory_available_mib=512,
    nvml_error="test host",
)


@pytest.fixture
def results(tmp_path: Path) -> dict[str, object]:
    env = DoctorEnv(config=ApplianceConfig(state_dir=tmp_path / "state"), host=CPU_HOST)
    return {r.name: r for r in run_checks(env)}


def test_every_check_answers_without_crashing(results: dict) -> None:
    assert list(results) == [name for name, _ in CHECKS]
    for r in results.values():
        assert not r.detail.startswith("check crashed"), r


def test_real_landlock_abi() -> None:
    assert landlock_abi() >= 1  # DESIGN.md: ABI 7 on the development machines


def test_landlock_and_seccomp_ok_here(results: dict) -> None:
    assert results["landlock"].status in ("ok", "warn"), results["landlock"]
    assert results["seccomp"].status == "ok", results["seccomp"]
    assert results["state dir"].status == "ok", results["state dir"]
