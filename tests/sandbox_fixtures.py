"""Shared helpers for tests that drive real sandboxes (rootless Podman) or the `appliance` CLI.

`sandbox_skip_reason()` says why this machine cannot create sandboxes (None when it can);
`ensure_base_image()` builds (or reuses, from the rootfs cache) the base image once per session;
`ensure_cpu_image()` the CPU appliance image (the `cpu_image` fixture in tests/conftest.py);
`cli_env()` / `run_cli()` run the installed console script as a subprocess against a private
state directory, never the machine's real config or state.

The suite runs in two pytest-xdist workers (scripts/test.sh): each shared build holds an
exclusive lock on a file next to its cache while it checks and builds, so the second worker
waits for the first and then reuses its result instead of building twice or racing Podman.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sandbox.images.base import (
    build_lock as cache_lock,  # one flock helper: tests and builders share it
)
from tests.helpers import SERVICE_USER

# Read at import: the autouse isolated_env fixture strips APPLIANCE_* from the environment.
IMAGE_CACHE = Path(os.environ.get("APPLIANCE_IMAGE_CACHE", "/var/tmp/appliance-image-cache"))
APPLIANCE = str(Path(sys.executable).parent / "appliance")

_base_image: list[Any] = []  # the ImageRef, once built or found
_podman_started = False
_cpu_image: dict[str, Any] = {}


def sandbox_skip_reason() -> str | None:
    """Why real sandboxes cannot be created here, or None."""
    if os.geteuid() != 0:
        return "sandboxes are created by root (the control plane)"
    for tool in ("podman", "runc", "debootstrap", "newuidmap"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (scripts/setup.sh installs it as root)"
    try:
        pwd.getpwnam(SERVICE_USER)
    except KeyError:
        return f"no service user {SERVICE_USER!r} (scripts/setup-service-user.sh)"
    return None


def service_home() -> Path | None:
    try:
        return Path(pwd.getpwnam(SERVICE_USER).pw_dir)
    except KeyError:
        return None


def podman_client():
    """A podman-py client on the service user's API socket (starting the service if needed).

    The first start is serialised: two workers starting it at once would each unlink the
    other's socket and leave a podman nobody can reach. Nothing in the suite stops it."""
    global _podman_started
    from sandbox.lifecycle.podman_service import PodmanService

    service = PodmanService(user=SERVICE_USER)
    if _podman_started:
        return service.start()
    with cache_lock(IMAGE_CACHE / ".podman-service.lock"):
        client = service.start()
    _podman_started = True
    return client


def ensure_base_image() -> Any:
    """`localhost/appliance-base:latest` in the service user's storage (cached rootfs); its
    ImageRef."""
    if _base_image:
        return _base_image[0]
    from sandbox.images.base import build_base_image

    with cache_lock(IMAGE_CACHE / ".tests-base.lock"):  # the import runs outside sandbox's lock
        _base_image.append(build_base_image(podman_client(), workdir=IMAGE_CACHE))
    return _base_image[0]


def cpu_image_skip_reason() -> str | None:
    """Why the CPU appliance image can be neither found nor built here, or None."""
    from appliance.packaging import appliance_image as ai

    if (why := sandbox_skip_reason()) is not None:
        return why
    t = ai.target("cpu")
    digest = ai.inputs_digest(ai.inputs(t, ensure_base_image().image_id))
    if ai.find_appliance_image(podman_client(), t, digest) is None:
        try:
            socket.create_connection(("pypi.org", 443), timeout=5).close()
        except OSError as exc:
            return f"pypi.org unreachable ({exc}) and the cpu image is not built yet"
    return None


def ensure_cpu_image() -> dict[str, Any]:
    """The CPU appliance image of this source tree, built once (or found by its inputs) and
    shared by every test that needs it: {"ref", "digest" (the inputs digest computed before the
    build), "first_s" (building or finding it), "again" and "second_s" (asking at once again)}."""
    if _cpu_image:
        return _cpu_image
    from appliance.packaging import appliance_image as ai
    from appliance.packaging.appliance_image_build import build_appliance_image

    with cache_lock(IMAGE_CACHE / ".tests-cpu-image.lock"):
        t = ai.target("cpu")
        digest = ai.inputs_digest(ai.inputs(t, ensure_base_image().image_id))
        t0 = time.monotonic()
        ref = build_appliance_image(podman_client(), "cpu", workdir=IMAGE_CACHE, progress=print)
        first = time.monotonic() - t0
        t0 = time.monotonic()
        again = build_appliance_image(podman_client(), "cpu", workdir=IMAGE_CACHE)
        second = time.monotonic() - t0
        _cpu_image.update(ref=ref, digest=digest, first_s=first, again=again, second_s=second)
    return _cpu_image


def run_cli(
    *args: str,
    env: dict[str, str],
    prefix: list[str] | None = None,
    timeout: float = 120,
    user: int | None = None,
) -> subprocess.CompletedProcess[str]:
    """`appliance ARGS...` (optionally behind `prefix`, e.g. nsenter) and its captured output."""
    return subprocess.run(
        [*(prefix or []), APPLIANCE, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        stdin=subprocess.DEVNULL,
        **({"user": user, "group": user, "extra_groups": []} if user is not None else {}),
    )


def proxy_pids(sandbox: str, state_dir: Path) -> list[int]:
    """Egress proxy processes serving `sandbox` for this state dir (matched on their argv)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if (
            b"sandbox.proxy" in argv
            and sandbox.encode() in argv
            and any(str(state_dir).encode() in a for a in argv)
        ):
            pids.append(int(proc.name))
    return pids


def kill_proxies(sandbox: str, state_dir: Path) -> None:
    """Cleanup: stop the proxies this test's control plane started for `sandbox`, if any."""
    for pid in proxy_pids(sandbox, state_dir):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)


def force_remove_container(name: str) -> None:
    with contextlib.suppress(Exception):
        podman_client().containers.get(name).remove(force=True)


@contextlib.contextmanager
def sandbox_manager(prefix: str) -> Iterator[Any]:
    """A SandboxManager on its own short state dir (unix socket paths live under it and must
    stay <= 107 bytes); every sandbox it still has is removed afterwards."""
    from appliance.config import load_config
    from appliance.control.wiring import sandbox_manager as build_manager
    from appliance.store import open_store

    state = Path(tempfile.mkdtemp(prefix=prefix))
    config = load_config({"state_dir": str(state)})
    try:
        with open_store(config.state_dir) as store:
            m = build_manager(config, store)
            try:
                yield m
            finally:
                for record in m.boxes.list():
                    m.remove(record.name)
    finally:
        shutil.rmtree(state, ignore_errors=True)
