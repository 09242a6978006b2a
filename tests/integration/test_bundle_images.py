"""`bundle install` loads a pinned image for real: a throwaway layer image (base + labels) is
built in the service user's Podman, bundled, removed, then installed from the bundle; the pin
resolves again and a second install loads nothing. The shared base and OpenClaw images are left
alone (other tests use them)."""

from __future__ import annotations

import io
import json
import tarfile
import uuid
from pathlib import Path

import pytest

from tests.sandbox_fixtures import ensure_base_image, podman_client, sandbox_skip_reason

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_install_loads_a_missing_pinned_image(tmp_path: Path) -> None:
    if (reason := sandbox_skip_reason()) is not None:
        pytest.skip(reason)
    from appliance.config import ApplianceConfig
    from appliance.packaging import bundle as b
    from appliance.packaging.images import find_pinned
    from sandbox.images.base import RECIPE_LABEL, save_image
    from sandbox.images.layers import podman_build

    ensure_base_image()
    client = podman_client()
    pin = "sha256:" + uuid.uuid4().hex * 2
    tag = f"localhost/appliance-bundle-test:{pin[7:19]}"
    containerfile = (
        "FROM localhost/appliance-base:latest\n"
        f"LABEL org.appliance.layer=bundle-test {RECIPE_LABEL}={pin}\n"
    ).encode()
    context = tmp_path / "context.tar"
    with tarfile.open(context, "w") as tar:
        info = tarfile.TarInfo("Containerfile")
        info.size = len(containerfile)
        tar.addfile(info, io.BytesIO(containerfile))
    image_id = podman_build(client, context, tag, progress=lambda _: None)
    try:
        root = tmp_path / "bundle"
        (root / "images").mkdir(parents=True)
        save_image(client, tag, root / "images" / "test.tar")
        row = {"file": "images/test.tar", "tag": tag, "pin": pin, "image_id": image_id}
        (root / b.MANIFEST).write_text(
            json.dumps(
                {
                    "format": b.FORMAT,
                    "arch": b.dpkg_arch(),
                    "python": b.python_tag(),
                    "sections": {"images": [row]},
                }
            )
        )
        b.write_sums(root)
        client.images.remove(image_id, force=True)
        assert find_pinned(client, pin) is None

        config = ApplianceConfig(state_dir=tmp_path / "state")
        options = b.InstallOptions(wheels=False)
        first = b.install_bundle(root, options, config)
        assert first.changed and first.steps["images"] == f"loaded {tag}"
        assert find_pinned(client, pin) == image_id
        again = b.install_bundle(root, options, config)
        assert not again.changed and "already present" in again.steps["images"]
    finally:
        if client.images.exists(image_id):
            client.images.remove(image_id, force=True)
