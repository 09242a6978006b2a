"""Blueprint image pins -> images in the service user's Podman storage.

A blueprint pins its image by digest: either the recipe digest this appliance builds from pinned
inputs (the same on every host; the image carries it as a label) or an image's own id (for an
image made elsewhere and loaded from an archive). An image present with that label or id is used;
a known recipe is built (with progress); anything else is a digest mismatch, and nothing starts.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from appliance.errors import ConfigError
from blueprints.model import Image
from sandbox.images.base import RECIPE_LABEL

IMAGE_CACHE = Path("/var/tmp/appliance-image-cache")
Progress = Callable[[str], None]


class ImageMismatch(ConfigError):
    hint = "pin a digest this appliance builds (`appliance image recipes`) or load the image"


def known_recipes() -> dict[str, tuple[str, Callable[[Any, Progress], str]]]:
    """recipe digest -> (what, builder(client, progress) -> image id)."""
    from sandbox.images.base import build_base_image, recipe_digest
    from sandbox.images.openclaw import build_openclaw_image
    from sandbox.images.openclaw import recipe_digest as openclaw_recipe_digest

    def base(client: Any, progress: Progress) -> str:
        return build_base_image(client, workdir=IMAGE_CACHE, progress=progress).image_id

    def openclaw(client: Any, progress: Progress) -> str:
        return build_openclaw_image(client, workdir=IMAGE_CACHE, progress=progress).image_id

    return {
        recipe_digest(): ("appliance base image (debootstrap bookworm)", base),
        openclaw_recipe_digest(): ("OpenClaw layer (Node, openclaw, ripgrep, fd)", openclaw),
    }


def find_pinned(client: Any, digest: str) -> str | None:
    """An image id carrying `digest` as its recipe label, or whose own id is `digest`."""
    for img in client.images.list(filters={"label": f"{RECIPE_LABEL}={digest}"}):
        return str(img.id)
    bare = digest.removeprefix("sha256:")
    for img in client.images.list():
        if str(img.id).removeprefix("sha256:") == bare:
            return str(img.id)
    return None


def resolve_image(client: Any, image: Image, progress: Progress) -> str:
    found = find_pinned(client, image.digest)
    if found is not None:
        return found
    recipes = known_recipes()
    if image.digest not in recipes:
        raise ImageMismatch(
            f"image {image.ref}: no local image has this digest and no recipe here makes it "
            f"(this appliance builds: {', '.join(sorted(recipes))})"
        )
    what, build = recipes[image.digest]
    progress(f"image: building {what}")
    build(client, progress)
    found = find_pinned(client, image.digest)
    if found is None:
        raise ImageMismatch(f"built {what}, but it does not carry {image.digest}")
    return found
