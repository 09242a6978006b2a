"""What every doctor check reads the host through, and what it answers.

Everything a check reads from the host goes through DoctorEnv (a filesystem root, `which`, `run`,
the Landlock probe), so tests drive each check against a fake tree instead of the real machine.
"""

from __future__ import annotations

import platform
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from appliance.config import ApplianceConfig
from hardware.plan_types import ServingPlan
from hardware.snapshot import HostSnapshot
from sandbox.supervisor.landlock import abi_version

Status = Literal["ok", "warn", "fail", "skip"]
RunFn = Callable[[Sequence[str]], "subprocess.CompletedProcess[str]"]

# The supervisor's probe uses the generic syscall table's numbers, which both arches use.
_LANDLOCK_MACHINES = ("x86_64", "aarch64", "arm64")


class CheckResult(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    status: Status
    detail: str
    fix: str | None = None


def landlock_abi() -> int:
    """The kernel's Landlock ABI version, probed as the in-sandbox supervisor probes it; raises
    OSError (ENOSYS, EOPNOTSUPP...) if unavailable."""
    if platform.machine() not in _LANDLOCK_MACHINES or platform.system() != "Linux":
        raise NotImplementedError(f"no Landlock syscall number known for {platform.machine()}")
    return abi_version()


def run_argv(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    # Never a shell; a short timeout so a wedged binary cannot hang the doctor.
    try:
        return subprocess.run(list(argv), capture_output=True, text=True, timeout=10, check=False)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(list(argv), 124, "", "timed out after 10 s")
    except OSError as exc:  # vanished or not executable between `which` and here
        return subprocess.CompletedProcess(list(argv), 126, "", str(exc))


@dataclass
class DoctorEnv:
    config: ApplianceConfig
    host: HostSnapshot
    root: Path = Path("/")  # where /proc, /sys and /etc are read from (a fake tree in tests)
    which: Callable[[str], str | None] = shutil.which
    run: RunFn = run_argv
    landlock_abi: Callable[[], int] = landlock_abi
    required_gib: float | None = None  # the planned model's weights on disk; None: unknown
    required_for: str | None = None  # what needs required_gib, for the detail ("super-nvfp4")
    plan: ServingPlan | None = None  # what the appliance would serve; None: planned from `host`

    def path(self, absolute: str) -> Path:
        return self.root / absolute.lstrip("/")


CheckFn = Callable[[DoctorEnv], CheckResult]


def read_text(env: DoctorEnv, absolute: str) -> str | None:
    """A host file's text under env.root; None when it is missing or unreadable."""
    try:
        return env.path(absolute).read_text()
    except OSError:
        return None
