"""Real rootless Podman: the service user's API socket, the debootstrap base image, and the
container properties every sandbox builds on (no network, no caps, read-only root, ulimits,
a unix socket reachable through a read-only bind, no-new-privileges, non-root uid).

Needs root, podman, runc, debootstrap and the `appliance` service user (scripts/setup.sh).
The rootfs tarball is cached in $APPLIANCE_IMAGE_CACHE (default /var/tmp/appliance-image-cache),
so only the first run pays for debootstrap (~50 s).
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import SERVICE_USER
from tests.sandbox_fixtures import IMAGE_CACHE as CACHE
from tests.sandbox_fixtures import sandbox_skip_reason

pytestmark = [pytest.mark.integration, pytest.mark.slow]

if (_reason := sandbox_skip_reason()) is not None:
    pytest.skip(_reason, allow_module_level=True)

from podman import PodmanClient  # noqa: E402

from sandbox.images.base import (  # noqa: E402
    REPOSITORY,
    ImageRef,
    build_base_image,
    load_image,
    save_image,
)
from sandbox.lifecycle.podman_service import PodmanService  # noqa: E402

PROBE = r"""
import errno, json, os, socket
out = {"uid": os.getuid(), "gid": os.getgid()}
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect("/run/appliance/egress/egress.sock")
out["unix"] = s.recv(16).decode()
try:
    socket.create_connection(("1.1.1.1", 80), timeout=3)
    out["tcp"] = "connected"
except OSError as e:
    out["tcp"] = errno.errorcode.get(e.errno, str(e))
for path in ("/probe", "/home/agent/probe", "/run/appliance/egress/probe"):
    try:
        open(path, "w").close()
        out[path] = "written"
    except OSError as e:
        out[path] = errno.errorcode.get(e.errno, str(e))
status = dict(l.split(":", 1) for l in open("/proc/self/status") if ":" in l)
out["NoNewPrivs"] = status["NoNewPrivs"].strip()
out["CapEff"] = status["CapEff"].strip()
out["CapBnd"] = status["CapBnd"].strip()
out["nofile"] = __import__("resource").getrlimit(__import__("resource").RLIMIT_NOFILE)
out["nproc"] = __import__("resource").getrlimit(__import__("resource").RLIMIT_NPROC)
out["setuid"] = [
    os.path.join(d, f) for d, _, fs in os.walk("/usr") for f in fs
    if not os.path.islink(os.path.join(d, f)) and os.lstat(os.path.join(d, f)).st_mode & 0o6000
]
print("PROBE" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def podman() -> Iterator[PodmanClient]:
    # A socket of its own, so a running control plane's service is neither reused nor stopped.
    uid = pwd.getpwnam(SERVICE_USER).pw_uid
    svc = PodmanService(
        user=SERVICE_USER, socket_path=Path(f"/run/user/{uid}/appliance-test-{os.getpid()}.sock")
    )
    client = svc.start()
    try:
        yield client
    finally:
        client.close()
        svc.stop()
        assert not svc.socket.exists()
        svc.socket.with_suffix(".log").unlink(missing_ok=True)


@pytest.fixture(scope="module")
def base_image(podman: PodmanClient) -> ImageRef:
    lines: list[str] = []
    ref = build_base_image(podman, workdir=CACHE, progress=lines.append)
    assert any(ln.startswith(("rootfs:", "image:")) for ln in lines)  # progress is reported
    return ref


@pytest.fixture
def egress_socket() -> Iterator[Path]:
    """A host dir holding a listening unix socket, traversable by the service user's subuids."""
    d = Path(tempfile.mkdtemp(prefix="appliance-egress-", dir="/tmp"))
    d.chmod(0o755)  # the rootless container runs as a subuid: it needs search on the dir
    path = d / "egress.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    path.chmod(0o666)  # connect() needs write permission on the socket inode
    srv.listen(4)
    stop = threading.Event()

    def serve() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.sendall(b"hello")

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield d
    finally:
        stop.set()
        t.join(2)
        srv.close()
        shutil.rmtree(d, ignore_errors=True)


def test_rebuild_is_instant_and_tagged(podman: PodmanClient, base_image: ImageRef) -> None:
    t0 = time.monotonic()
    again = build_base_image(podman, workdir=CACHE)
    assert time.monotonic() - t0 < 2.0
    assert again == base_image
    assert base_image.tag == f"{REPOSITORY}:{base_image.digest.removeprefix('sha256:')[:12]}"
    tags = podman.images.get(base_image.image_id).tags
    assert base_image.tag in tags
    assert f"{REPOSITORY}:latest" in tags


def test_container_posture(podman: PodmanClient, base_image: ImageRef, egress_socket: Path) -> None:
    ctr = podman.containers.create(
        base_image.tag,
        command=["python3", "-c", PROBE],
        network_mode="none",
        cap_drop=["ALL"],
        read_only=True,
        # podman-py maps security_opt to selinux_opts; no-new-privileges has its own key.
        no_new_privileges=True,
        user="1000:1000",
        # Explicit, below the host's hard limits: rootless podman cannot raise them.
        ulimits=[
            {"Name": "nofile", "Soft": 1024, "Hard": 1024},
            {"Name": "nproc", "Soft": 1000, "Hard": 1000},
        ],
        mounts=[
            {
                "type": "bind",
                "source": str(egress_socket),
                "target": "/run/appliance/egress",
                "read_only": True,
            }
        ],
    )
    try:
        ctr.start()
        rc = ctr.wait(condition="exited")
        logs = b"".join(ctr.logs(stdout=True, stderr=True)).decode(errors="replace")
        assert rc == 0, logs
        line = next(ln for ln in logs.splitlines() if ln.startswith("PROBE"))
        out = json.loads(line.removeprefix("PROBE"))
    finally:
        ctr.remove(force=True)
    assert out["uid"] == 1000 and out["gid"] == 1000
    assert out["unix"] == "hello"
    assert out["tcp"] == "ENETUNREACH"
    assert out["/probe"] == "EROFS"
    assert out["/home/agent/probe"] == "EROFS"
    assert out["/run/appliance/egress/probe"] == "EROFS"
    assert out["NoNewPrivs"] == "1"
    assert int(out["CapEff"], 16) == 0
    assert int(out["CapBnd"], 16) == 0
    assert out["nofile"] == [1024, 1024]
    assert out["nproc"] == [1000, 1000]
    assert out["setuid"] == []
    assert not podman.containers.exists(ctr.id)


def test_save_load_round_trip(
    podman: PodmanClient, base_image: ImageRef, tmp_path_factory: pytest.TempPathFactory
) -> None:
    archive = tmp_path_factory.mktemp("oci") / "base.oci.tar"
    save_image(podman, base_image, archive)
    assert archive.stat().st_size > 10_000_000
    # Drop the digest tag and load the archive: the tags come back from the image's labels. The
    # image itself stays (and keeps `:latest`): the other test worker's sandboxes run on it, and a
    # forced removal would remove their containers too. Loading an image that is absent from the
    # storage is tests/integration/test_bundle_images.py's round trip.
    podman.images.remove(base_image.tag)  # an untag: the image has other tags
    assert not podman.images.exists(base_image.tag)
    assert podman.images.exists(base_image.image_id)
    loaded = load_image(podman, archive)
    assert loaded.digest == base_image.digest
    assert loaded.tag == base_image.tag
    assert loaded.image_id == base_image.image_id
    tags = podman.images.get(loaded.image_id).tags
    assert {base_image.tag, f"{REPOSITORY}:latest"} <= set(tags)
