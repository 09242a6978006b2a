"""What every image layer built on top of a base shares: the labels that name a layer by its
inputs, the lookup by those labels, and `podman build` through the service user's libpod API
(no network, never pull). Used by the OpenClaw layer (openclaw.py) and the appliance images
(appliance/packaging/appliance_image_build.py).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from podman import PodmanClient
from podman.errors import ImageNotFound

from sandbox.images.base import ImageBuildError, Progress

LABEL_PREFIX = "org.appliance"
INPUTS_LABEL = f"{LABEL_PREFIX}.inputs-digest"


def inputs_digest(spec: Mapping[str, Any]) -> str:
    return "sha256:" + hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def find_by_inputs(client: PodmanClient, tag: str, digest: str) -> tuple[Any, dict[str, str]]:
    """The image tagged `tag` that carries `digest` as its inputs label, and its labels; a
    missing tag, a tag collision or a hand-made image is (None, {}): rebuild."""
    try:
        img = client.images.get(tag)
    except ImageNotFound:
        return None, {}
    labels = {str(k): str(v) for k, v in (img.labels or {}).items()}
    return (img, labels) if labels.get(INPUTS_LABEL) == digest else (None, {})


def podman_build(
    client: PodmanClient,
    context_tar: Path,
    tag: str,
    progress: Progress,
    timeout: float = 1800,
    params: Mapping[str, Any] | None = None,
) -> str:
    """POST the context to the service user's libpod /build: no network, never pull.
    `params` adds libpod build parameters (buildargs, labels, platform, outputformat)."""
    params = {
        "dockerfile": "Containerfile",
        "t": tag,
        "networkmode": "none",
        "pull": False,
        "layers": False,
        "rm": True,
        "forcerm": True,
        **(params or {}),
    }
    with open(context_tar, "rb") as fh:
        resp = client.api.post(
            "/build",
            params=params,
            data=fh,
            headers={"Content-Type": "application/x-tar"},
            stream=True,
            timeout=timeout,
        )
    try:
        if resp.status_code >= 300:
            raise ImageBuildError(f"podman build failed ({resp.status_code}): {resp.text.strip()}")
        image_id = ""
        for raw in resp.iter_lines():
            if not raw:
                continue
            msg = json.loads(raw)
            if "error" in msg:
                raise ImageBuildError(f"podman build: {msg['error']}")
            line = str(msg.get("stream", "")).strip()
            if line:
                progress(f"build: {line}")
                if len(line) == 64 and all(c in "0123456789abcdef" for c in line):
                    image_id = line  # the last stream line is the new image's id
    finally:
        resp.close()
    if not image_id:
        raise ImageBuildError("podman build ended without an image id")
    return image_id
