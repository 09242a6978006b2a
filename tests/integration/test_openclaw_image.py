"""The OpenClaw image layer on real Podman: built (or reused) with no image registry, labelled
with its pins, runnable inside a real sandbox (openclaw.yaml: Landlock hard_requirement, seccomp,
read-only root), and nothing in it writable by the agent (uid 1000).

The first build fetches from PyPI, npm and Debian (~2-3 min); later runs reuse the image by its
inputs digest (a few seconds), or its cached build context with no network at all.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sandbox.images.base import build_base_image

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.xdist_group("openclaw")]

POLICY = Path(__file__).resolve().parents[2] / "sandbox" / "policies" / "openclaw.yaml"
REGISTRIES = (("pypi.org", 443), ("registry.npmjs.org", 443), ("deb.debian.org", 80))
STAGED = ("/opt/openclaw", "/usr/local/bin", "/usr/bin/rg", "/usr/bin/fdfind")


def _unreachable() -> str | None:
    for host, port in REGISTRIES:
        try:
            socket.create_connection((host, port), timeout=5).close()
        except OSError as exc:
            return f"{host}:{port} unreachable ({exc}): the first build needs the registries"
    return None


@pytest.fixture(scope="module")
def layer() -> Any:
    from sandbox.images import openclaw as ai
    from tests.sandbox_fixtures import IMAGE_CACHE, podman_client, sandbox_skip_reason

    if (why := sandbox_skip_reason()) is not None:
        pytest.skip(why)
    if shutil.which("apt-cache") is None or shutil.which("dpkg-deb") is None:
        pytest.skip("ripgrep/fd-find are staged with apt and dpkg-deb (Debian hosts only)")
    client = podman_client()
    base = build_base_image(client, workdir=IMAGE_CACHE)
    digest = ai.inputs_digest(ai.inputs(base, ai.DEB_PINS, "bookworm"))
    context = IMAGE_CACHE / "openclaw" / f"context-{digest.removeprefix('sha256:')[:16]}.tar"
    cached = ai.find_agent_image(client, digest) is not None or context.exists()
    if not cached and (why := _unreachable()) is not None:
        pytest.skip(why)
    return ai.build_openclaw_image(client, workdir=IMAGE_CACHE, base=base)


def test_the_layer_is_tagged_by_its_inputs_and_labelled_with_the_pins(layer: Any) -> None:
    from sandbox.images import openclaw as ai
    from tests.sandbox_fixtures import IMAGE_CACHE, podman_client

    labels = layer.labels
    assert layer.tag == ai.tag_for(layer.inputs_digest)
    assert labels[ai.INPUTS_LABEL] == layer.inputs_digest
    assert labels["org.appliance.node.version"] == ai.NODE_VERSION == "24.19.0"
    assert labels["org.appliance.node.wheel-sha256"] == ai.NODE_WHEEL_SHA256
    assert labels["org.appliance.openclaw.version"] == ai.OPENCLAW_VERSION == "2026.9.6"
    assert labels["org.appliance.openclaw.integrity"] == ai.OPENCLAW_INTEGRITY
    assert labels["org.appliance.openclaw.integrity"].startswith("sha512-Ie0kyQSCVfFq")
    assert set(ai.DEB_PACKAGES) <= {k.rsplit(".", 1)[1] for k in labels if ".deb." in k}
    assert labels["org.appliance.base-digest"].startswith("sha256:")

    # Same inputs: a lookup, not a build.
    t0 = time.monotonic()
    again = ai.build_openclaw_image(podman_client(), workdir=IMAGE_CACHE)
    assert again.image_id == layer.image_id
    assert time.monotonic() - t0 < 30


@pytest.fixture
def manager() -> Iterator[Any]:
    from tests.sandbox_fixtures import sandbox_manager

    with sandbox_manager("oc-") as m:
        yield m


def _logs_when_exited(m: Any, name: str, timeout: float = 60) -> str:
    container = m.container(name)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        container.reload()
        if container.status in ("exited", "stopped"):
            break
        time.sleep(0.2)
    return b"".join(container.logs(stdout=True, stderr=True)).decode(errors="replace")


def test_openclaw_runs_inside_a_real_sandbox(layer: Any, manager: Any) -> None:
    from sandbox.lifecycle.manager import read_policy_file

    name = f"oc-ver-{os.getpid()}"
    script = "openclaw --version && rg --version | head -1 && fd --version && echo done"
    manager.create(name, read_policy_file(POLICY), ["sh", "-c", script], image=layer.tag)
    report = manager.enforcement(name)
    assert report["agent_started"] is True
    assert report["landlock"]["enforced"] is True and report["landlock"]["abi"] >= 6
    assert report["seccomp_mode"] == 2
    logs = _logs_when_exited(manager, name)
    assert "OpenClaw 2026.9.6" in logs, logs
    # `fd` is the symlink to Debian's fdfind, which names itself after the real binary.
    assert "ripgrep 13" in logs and "fdfind 8" in logs and "done" in logs, logs


def test_nothing_in_the_layer_is_writable_by_the_agent(layer: Any) -> None:
    from tests.sandbox_fixtures import podman_client

    # A writable root (unlike a sandbox's): only ownership and modes can stop uid 1000 here.
    check = (
        f"find {' '.join(STAGED)} \\( -writable -o \\( ! -type l \\( ! -uid 0 -o ! -gid 0 "
        "-o -perm /6022 \\) \\) \\) -print | head -20; echo scanned"
    )
    container = podman_client().containers.create(
        layer.tag,
        ["sh", "-c", check],
        user="1000:1000",
        network_mode="none",
        # Rootless here cannot raise the host's hard limits: ask for lower ones (DESIGN.md).
        ulimits=[
            {"Name": "nofile", "Soft": 1024, "Hard": 1024},
            {"Name": "nproc", "Soft": 1000, "Hard": 1000},
        ],
    )
    try:
        container.start()
        container.wait(timeout=120)
        text = b"".join(container.logs(stdout=True, stderr=True)).decode(errors="replace")
    finally:
        container.remove(force=True)
    assert text.strip() == "scanned", text
