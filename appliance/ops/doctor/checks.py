"""The doctor's list of checks, in display order, and the runner that never raises."""

from __future__ import annotations

from collections.abc import Sequence

from appliance.ops.doctor.env import CheckFn, CheckResult, DoctorEnv
from appliance.ops.doctor.sandbox_host import (
    check_landlock,
    check_oci_runtime,
    check_podman,
    check_seccomp,
    check_service_user,
    check_userns,
)
from appliance.ops.doctor.serving_host import (
    check_backend_port,
    check_cdi_spec,
    check_container_toolkit,
    check_disk,
    check_gateway_port,
    check_nvidia_driver,
    check_serving_path,
    check_state_dir,
)

# Display order: kernel, rootless Podman, GPU, then this appliance's own resources.
CHECKS: list[tuple[str, CheckFn]] = [
    ("landlock", check_landlock),
    ("seccomp", check_seccomp),
    ("user namespaces", check_userns),
    ("service user", check_service_user),
    ("podman", check_podman),
    ("oci runtime", check_oci_runtime),
    ("nvidia driver", check_nvidia_driver),
    ("container toolkit", check_container_toolkit),
    ("cdi spec", check_cdi_spec),
    ("serving path", check_serving_path),
    ("gateway port", check_gateway_port),
    ("backend port", check_backend_port),
    ("model disk space", check_disk),
    ("state dir", check_state_dir),
]


def run_checks(env: DoctorEnv, checks: Sequence[tuple[str, CheckFn]] = CHECKS) -> list[CheckResult]:
    """Run every check; never raises (a crashing check becomes a failed result)."""
    results: list[CheckResult] = []
    for name, check in checks:
        try:
            results.append(check(env))
        except Exception as exc:  # a doctor that crashes hides every other answer
            results.append(
                CheckResult(
                    name=name,
                    status="fail",
                    detail=f"check crashed: {type(exc).__name__}: {exc}",
                    fix="a bug in this check; report it with the detail above",
                )
            )
    return results


def all_ok(results: Sequence[CheckResult]) -> bool:
    """True when nothing failed (warnings and skips are fine)."""
    return not any(r.status == "fail" for r in results)
