"""Is the appliance image `appliance up` would run in the backend's Podman store, and is it the
build of this checkout?

`appliance image build --target T` tags each build `localhost/appliance-T:<inputs12>` and
`:latest` and labels it with its inputs digest (recipe, Containerfile, base image, pins, the
appliance's own source: appliance/packaging/appliance_image.py). After a code change `:latest`
is an image of the old code, so it counts only when it carries the digest of the current inputs.
That digest needs the base image's id: the cpu target's base is the debootstrap image in the
same store; a GPU target's is the vLLM image, which a host that loaded the image from an
archive does not hold (then `:latest` is taken as it is: such a host must not be asked to pull).

Read-only and quick: `podman image exists` / `image inspect` only (tens of ms each).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass

from appliance.config import ApplianceConfig
from appliance.errors import ApplianceError
from sandbox.lifecycle.errors import HostNotReady

Labels = dict[str, str]


class _NoAnswer(Exception):
    """Podman could not say (not installed, no service user, an unexpected exit)."""


@dataclass(frozen=True)
class ImageFacts:
    ref: str  # the image the backend runs
    present: bool | None  # in the store; None: podman could not say
    configured: bool = False  # inference.container.image names it: no build makes it
    built_from: str | None = None  # the inputs digest `ref` is labelled with
    base: str | None = None  # the base as the current inputs name it; None: not in the store
    current: str | None = None  # the current inputs' digest; None: not computable here
    current_tag: str | None = None  # localhost/appliance-T:<inputs12> of the current inputs
    current_tag_present: bool | None = None  # a build of them is in the store (maybe not :latest)

    @property
    def up_to_date(self) -> bool | None:
        """`ref` is the build of the current inputs; None: the inputs could not be computed."""
        if self.present is None or self.current is None:
            return None
        return bool(self.present) and self.built_from == self.current


def _podman(config: ApplianceConfig, *args: str) -> subprocess.CompletedProcess[str]:
    """podman as the account the backend container runs as (the service user's store)."""
    from appliance.services.supervisor import podman_account

    if shutil.which("podman") is None:
        raise _NoAnswer("podman is not installed")
    try:
        account = podman_account(config)
        return subprocess.run(
            account.argv(*args),
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
            env=dict(account.env) if account.env is not None else None,
            cwd=account.home,
            **account.popen_kwargs(os.geteuid()),  # type: ignore[arg-type]
        )
    except (OSError, subprocess.TimeoutExpired, HostNotReady) as exc:  # e.g. no service user
        raise _NoAnswer(str(exc)) from None


def _exists(config: ApplianceConfig, ref: str) -> bool:
    code = _podman(config, "image", "exists", ref).returncode
    if code not in (0, 1):
        raise _NoAnswer(f"`podman image exists` exited with {code}")
    return code == 0


def inspect(config: ApplianceConfig, ref: str) -> tuple[str, Labels] | None:
    """(image id, labels) of `ref` in that store; None when it is not there. One podman call
    when it is there or says "image not known"; `image exists` settles any other failure."""
    done = _podman(config, "image", "inspect", "--format", "{{.Id}}\t{{json .Labels}}", ref)
    image_id, _, labels = done.stdout.strip().partition("\t")
    if done.returncode != 0 or not image_id:
        if "image not known" in done.stderr or not _exists(config, ref):
            return None
        raise _NoAnswer(f"`podman image inspect` exited with {done.returncode}")
    try:
        parsed = json.loads(labels or "null") or {}
    except ValueError:
        parsed = {}
    return image_id, {str(k): str(v) for k, v in parsed.items()}


def _base_identity(config: ApplianceConfig, target_name: str) -> str | None:
    """The base as `build_appliance_image` names it in the inputs, if it is in the store: the
    cpu base's id (only the base of the current debootstrap recipe: else a build makes a new
    one), a vLLM image's `REF (ID)`."""
    from appliance.packaging.appliance_image import target
    from sandbox.images.base import RECIPE_LABEL, REPOSITORY, recipe_digest

    t = target(target_name)
    if t.local_base:
        found = inspect(config, f"{REPOSITORY}:latest")
        if found is None or found[1].get(RECIPE_LABEL) != recipe_digest():
            return None
        return found[0]
    found = inspect(config, t.default_base)
    return f"{t.default_base} ({found[0]})" if found else None


def probe_image(config: ApplianceConfig, target_name: str, ref: str) -> ImageFacts:
    """What the image step needs to know about `ref` (the image of `target_name`)."""
    from appliance.packaging.appliance_image import inputs, inputs_digest, tag_for, target
    from sandbox.images.layers import INPUTS_LABEL

    configured = config.inference.container.image is not None
    try:
        found = inspect(config, ref)
    except _NoAnswer:
        return ImageFacts(ref=ref, present=None, configured=configured)
    facts = ImageFacts(
        ref=ref,
        present=found is not None,
        configured=configured,
        built_from=found[1].get(INPUTS_LABEL) if found else None,
    )
    if configured:
        return facts  # the operator's image: used as it is
    try:
        base = _base_identity(config, target_name)
        if base is None:
            return facts
        t = target(target_name)
        digest = inputs_digest(inputs(t, base))
        tag = tag_for(t, digest)
        built = inspect(config, tag)
    except (_NoAnswer, ApplianceError, OSError):  # e.g. a pin not installed here
        return facts
    return ImageFacts(
        ref=ref,
        present=facts.present,
        configured=False,
        built_from=facts.built_from,
        base=base,
        current=digest,
        current_tag=tag,
        current_tag_present=built is not None and built[1].get(INPUTS_LABEL) == digest,
    )
