"""Stopping the backend's container leaves none behind, whatever `podman run` was doing: the
removal runs after `podman run`'s whole process group is dead, so a `podman run` still creating
the container when it was signalled cannot leave one. A stand-in `podman` (a real process
group, real signals) records what it was asked and creates "the container" on SIGTERM, as a
`podman run` caught mid-create does."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from inference.backends import ProcessBackend
from inference.backends.container import ContainerSpec
from tests.helpers import free_port

pytestmark = [pytest.mark.integration]

FAKE_PODMAN = """#!/bin/sh
# argv: --runtime runc COMMAND ...
state="$FAKE_PODMAN_STATE"
echo "$3" >> "$state/calls"
case "$3" in
run)
    trap 'touch "$state/container"; exit 143' TERM
    while :; do sleep 0.05; done ;;
rm) rm -f "$state/container" ;;
esac
"""


def test_a_container_created_as_podman_run_is_signalled_is_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    podman = tmp_path / "podman"
    podman.write_text(FAKE_PODMAN)
    podman.chmod(0o755)
    monkeypatch.setenv("FAKE_PODMAN_STATE", str(tmp_path))
    spec = ContainerSpec(
        image="localhost/appliance-cpu:latest",
        name="appliance-backend-0123abcd",
        cache_volume="appliance-backend-cache-0123abcd",
        podman=str(podman),
    )
    backend = ProcessBackend(
        ["/opt/appliance/venv/bin/python", "-m", "inference.embedded"],
        base_url=f"http://127.0.0.1:{free_port()}",
        log_path=tmp_path / "backend.log",
        container=spec,
    )
    backend.start()
    calls = tmp_path / "calls"
    deadline = time.monotonic() + 10
    while not calls.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    backend.stop(grace=1)
    assert not backend.running
    assert not (tmp_path / "container").exists(), "a container was left behind"
    assert calls.read_text().split() == ["run", "stop", "rm"]  # rm last: after the group died
