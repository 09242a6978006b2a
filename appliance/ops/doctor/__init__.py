"""Preflight checks (`appliance doctor`): is this host ready to serve a model and run sandboxes?

Each check is a plain function `(DoctorEnv) -> CheckResult` (env.py), grouped by what it checks:
sandbox_host.py (kernel confinement, rootless Podman) and serving_host.py (GPU stack, ports, disk,
state dir); checks.py lists them in display order and runs them. Every non-ok result carries a
`fix` the operator can act on.
"""

from appliance.ops.doctor.checks import CHECKS, all_ok, run_checks
from appliance.ops.doctor.env import CheckResult, DoctorEnv, landlock_abi

__all__ = ["CHECKS", "CheckResult", "DoctorEnv", "all_ok", "landlock_abi", "run_checks"]
