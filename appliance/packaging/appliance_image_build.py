"""Building an appliance image (appliance_image.py says what it is): the base in the service
user's store (never pulled without --pull), the build context (wheelhouse, pip, vLLM extras) as
one tarball, `podman build --network=none`, and pruning older builds of the target.
"""

from __future__ import annotations

import io
import pwd
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

from appliance.packaging.appliance_image import (
    ApplianceImageError,
    ApplianceImageRef,
    Progress,
    Target,
    build_spec,
    find_appliance_image,
    host_oci_platform,
    inputs,
    inputs_digest,
    pip_pin,
    target,
    wheel_target,
)
from appliance.packaging.wheelhouse import (
    REQUIREMENTS_FILE,
    WheelhouseError,
    build_wheelhouse,
    download_wheels,
)
from sandbox.images.layers import LABEL_PREFIX

# -- the base image ----------------------------------------------------------------------------


def _oci_arch(arch: str) -> str:
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(arch, arch)


def _load_command(service_user: str) -> str:
    """How to load an archive into the service user's rootless store (its shell is nologin)."""
    try:
        pw = pwd.getpwnam(service_user)
        home, uid = pw.pw_dir, str(pw.pw_uid)
    except KeyError:
        home, uid = f"~{service_user}", f"$(id -u {service_user})"
    return (
        f"`runuser -u {service_user} -- env HOME={home} XDG_RUNTIME_DIR=/run/user/{uid} "
        "podman load -i vllm.tar`"
    )


def _resolve_base(
    client: Any,
    t: Target,
    base: str | None,
    workdir: Path,
    pull: bool,
    progress: Progress,
    service_user: str = "appliance",
) -> tuple[str, str]:
    """(reference, image id) of the base in the service user's store; never pulled unless
    `pull` (and never for the cpu target, whose base is built here)."""
    from podman.errors import ImageNotFound

    if t.local_base and base is None:
        from sandbox.images.base import build_base_image

        ref = build_base_image(client, workdir=workdir, progress=progress)
        return ref.tag, ref.image_id
    ref = base or t.default_base
    try:
        img = client.images.get(ref)
    except ImageNotFound:
        if not pull or t.local_base:
            raise ApplianceImageError(
                f"{t.name}: base image {ref} is not in the service user's image store, and "
                "nothing is pulled without --pull",
                hint=f"on a connected host `podman pull --platform {t.platform} {ref}` and "
                f"`podman save -o vllm.tar {ref}`, here {_load_command(service_user)}; or build "
                "on a connected host with --pull",
            ) from None
        progress(f"base: pulling {ref} ({t.platform})")
        img = _pull(client, t, ref, progress)
    arch = _oci_arch(str(img.attrs.get("Architecture", "")))
    want = t.platform.split("/", 1)[1]
    if arch and arch != want:
        raise ApplianceImageError(
            f"{t.name}: base image {ref} is linux/{arch}, the target is {t.platform}",
            hint=f"load the {t.platform} variant of {ref}",
        )
    return ref, str(img.id)


def _pull(client: Any, t: Target, ref: str, progress: Progress) -> Any:
    from podman.errors import APIError, ImageNotFound

    error = ""
    try:
        for msg in client.images.pull(ref, platform=t.platform, stream=True, decode=True):
            if isinstance(msg, dict) and msg.get("error"):
                error = str(msg["error"]).strip()
            elif isinstance(msg, dict) and msg.get("status"):
                progress(f"base: {msg['status']}")
        return client.images.get(ref)
    except (APIError, ImageNotFound) as exc:
        error = error or str(exc)
    raise ApplianceImageError(
        f"{t.name}: pulling {ref} failed: {(error.splitlines() or ['no image came back'])[0]}",
        hint="check that the registry is reachable, or load the image from an archive",
    )


def _check_can_run(t: Target) -> None:
    """RUN steps execute the target's binaries: a foreign architecture needs binfmt (qemu)."""
    here = host_oci_platform()
    if t.platform == here:
        return
    qemu = {"linux/arm64": "qemu-aarch64", "linux/amd64": "qemu-x86_64"}.get(t.platform, "")
    if not (qemu and Path("/proc/sys/fs/binfmt_misc", qemu).exists()):
        raise ApplianceImageError(
            f"{t.name}: the image is {t.platform} and this host is {here}, with no binfmt "
            f"handler ({qemu or 'none'}) to run its build steps",
            hint="build on a host of that architecture, or install qemu-user-static",
        )


def _check_python(t: Target) -> None:
    if t.wheel_platform is None and f"{sys.version_info[0]}.{sys.version_info[1]}" != t.python:
        raise ApplianceImageError(
            f"{t.name}: the wheelhouse is made for this Python "
            f"({sys.version_info[0]}.{sys.version_info[1]}), the image runs Python {t.python}",
            hint=f"run the build from an appliance installed on Python {t.python}",
        )


# -- the build context -------------------------------------------------------------------------


def _write_context(
    t: Target, ours: Path, context_tar: Path, progress: Progress
) -> dict[str, float]:
    """Containerfile + wheels/ + tools/ (+ vllm-extras/) as one tarball with root owners."""
    wheel_platform, python_version = wheel_target(t)
    t0 = time.monotonic()
    try:
        wh = build_wheelhouse(
            ours / "wheels",
            extras=t.extras,
            progress=progress,
            platform=wheel_platform,
            python_version=python_version,
        )
        pip = download_wheels(ours / "tools", [pip_pin()], progress=progress)
        extras = (
            download_wheels(
                ours / "vllm-extras",
                list(t.vllm_extras),
                platform=wheel_platform,
                python_version=python_version,
                progress=progress,
            )
            if t.vllm_extras
            else []
        )
    except WheelhouseError as exc:
        raise ApplianceImageError(f"{t.name}: wheelhouse: {exc}", hint=exc.hint) from None
    fetched = time.monotonic() - t0
    size = sum(p.stat().st_size for p in wh.wheels)
    progress(f"wheels: {len(wh.wheels)} wheels, {size / 1e6:.0f} MB in {fetched:.0f} s")
    members: list[tuple[Path | bytes, str]] = [(t.containerfile.read_bytes(), "Containerfile")]
    members += [(w, f"wheels/{w.name}") for w in wh.wheels]
    members.append((wh.requirements, f"wheels/{REQUIREMENTS_FILE}"))
    # One fixed name: the Containerfile runs `python tools/pip.whl/pip` (a path into the zip,
    # which no shell glob can match); the version is in the inputs digest.
    members += [(w, "tools/pip.whl") for w in pip]
    if t.vllm_extras:
        members += [(w, f"vllm-extras/{w.name}") for w in extras]
        pins = "\n".join(t.vllm_extras) + "\n"
        members.append((pins.encode(), f"vllm-extras/{REQUIREMENTS_FILE}"))
    tmp = context_tar.with_suffix(".part")
    with tarfile.open(tmp, "w") as tar:
        for source, name in members:
            _add(tar, source, name)
    tmp.rename(context_tar)
    return {"wheels_mb": round(size / 1e6, 1), "fetch_s": round(fetched, 1)}


def _add(tar: tarfile.TarFile, source: Path | bytes, name: str) -> None:
    info = tarfile.TarInfo(name)
    info.uid = info.gid = 0
    info.mode = 0o644
    info.mtime = 0  # the digest names the image; the context needs no timestamps
    if isinstance(source, bytes):
        info.size = len(source)
        tar.addfile(info, io.BytesIO(source))
        return
    info.size = source.stat().st_size
    with open(source, "rb") as fh:
        tar.addfile(info, fh)


# -- the whole build ---------------------------------------------------------------------------


def build_appliance_image(
    client: Any,
    name: str,
    *,
    workdir: Path,
    base: str | None = None,
    pull: bool = False,
    progress: Progress = lambda _: None,
    service_user: str = "appliance",
) -> ApplianceImageRef:
    """Build (or reuse) `localhost/appliance-<target>:<inputs12>` (and `:latest`)."""
    from sandbox.images.base import ImageBuildError, build_lock
    from sandbox.images.layers import podman_build

    t = target(name)
    _check_python(t)
    base_ref, base_id = _resolve_base(client, t, base, Path(workdir), pull, progress, service_user)
    _check_can_run(t)
    # The cpu base is named by id (never pulled; its tag moves); a vLLM image by its reference,
    # which may carry a digest pin, and by id.
    digest = inputs_digest(inputs(t, base_id if t.local_base else f"{base_ref} ({base_id})"))
    spec = build_spec(t, base=base_ref, digest=digest, base_id=base_id)
    ours = Path(workdir) / "appliance" / t.name
    with build_lock(ours / ".build.lock"):
        found = find_appliance_image(client, t, digest)
        if found is not None:
            progress(f"image: {found.tag} already present")
            client.images.get(found.image_id).tag(t.repository, "latest")
            return found
        context_tar = ours / f"context-{digest.removeprefix('sha256:')[:16]}.tar"
        _write_context(t, ours, context_tar, progress)
        t0 = time.monotonic()
        progress(f"image: podman build --network=none FROM {base_ref} ({base_id[:12]})")
        try:
            image_id = podman_build(client, context_tar, spec.tag, progress, params=spec.params)
        except ImageBuildError as exc:
            raise ApplianceImageError(f"{t.name}: {str(exc).splitlines()[0]}") from None
        finally:
            context_tar.unlink(missing_ok=True)  # the wheels stay cached; this is a copy
        client.images.get(image_id).tag(t.repository, "latest")
        found = find_appliance_image(client, t, digest)
        if found is None:
            raise ApplianceImageError(f"build reported {image_id[:12]} but {spec.tag} is missing")
        progress(
            f"image: built {found.tag} in {time.monotonic() - t0:.0f} s ({found.size / 1e6:.0f} MB)"
        )
        _prune(client, t, found.image_id, progress)
        return found


def _created(img: Any) -> float:
    try:
        return float(img.attrs.get("Created") or 0)  # libpod's list: epoch seconds
    except (TypeError, ValueError):
        return 0.0


def _prune(client: Any, t: Target, current: str, progress: Progress, keep: int = 1) -> None:
    """Remove older builds of this target but the newest `keep` (a rollback): each code change
    makes a new ~1.4 GB image. One a container still uses stays."""
    from podman.errors import APIError

    older = [
        img
        for img in client.images.list(filters={"label": f"{LABEL_PREFIX}.image.target={t.name}"})
        if img.id != current
    ]
    older.sort(key=_created, reverse=True)
    for img in older[keep:]:
        try:
            client.images.remove(img.id)
            progress(f"image: removed an older build {img.id[:12]} ({', '.join(img.tags)})")
        except APIError as exc:
            progress(f"image: kept {img.id[:12]}: {str(exc).splitlines()[0]}")
