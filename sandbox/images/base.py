"""The base sandbox image, built with no registry: debootstrap rootfs -> hardened -> tar ->
`podman import` into the service user's storage (through its API socket), tagged by content digest.

The rootfs tarball is cached by (suite, variant, sorted packages, mirror, recipe version), so a
rebuild with nothing changed is a tag lookup; a missing image with a cached tarball is one import.
`save_image`/`load_image` move the image to and from OCI archives for offline hosts.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from podman import PodmanClient
from podman.errors import APIError, ImageNotFound

REPOSITORY = "localhost/appliance-base"
DIGEST_LABEL = "org.appliance.rootfs-digest"
# What blueprints pin: the recipe (suite, variant, packages, recipe version), which is the same on
# every host, unlike the rootfs digest (debootstrap output differs in timestamps and point
# releases). The rootfs digest stays on the image as a label, for the record.
RECIPE_LABEL = "org.appliance.recipe-digest"
# Bump when the hardening or layout below changes: it is part of the cache key.
RECIPE_VERSION = 1
# python3-minimal alone lacks json, ctypes, asyncio, shutil, ...: the in-sandbox supervisor needs
# the whole standard library (libpython3-stdlib), still without pip, venv or a compiler.
BASE_PACKAGES: tuple[str, ...] = ("ca-certificates", "libpython3-stdlib", "python3-minimal")
AGENT_UID = 1000
AGENT_GID = 1000
AGENT_HOME = "/home/agent"
# Mount targets the sandbox spec binds onto; they exist so a read-only root needs no mkdir.
MOUNTPOINTS: tuple[str, ...] = (
    "/opt/appliance/supervisor",
    "/run/appliance/config",
    "/run/appliance/egress",
    "/run/appliance/report",
    "/workspace",
)
# Removed from the rootfs: caches and logs that only add size or leak build-host details.
_PRUNE_GLOBS: tuple[str, ...] = (
    "var/cache/apt/*.bin",
    "var/cache/apt/archives/*.deb",
    "var/cache/debconf/*-old",
    "var/lib/apt/lists/*",
    "var/log/*.log",
    "var/log/apt/*",
    "usr/share/doc/*",
    "usr/share/man/*",
    "usr/share/info/*",
)

Progress = Callable[[str], None]


class ImageBuildError(RuntimeError):
    """The base image could not be built, imported, saved or loaded."""


@dataclass(frozen=True)
class ImageRef:
    tag: str  # localhost/appliance-base:<first 12 hex of digest>
    digest: str  # sha256:<hex> of the rootfs tarball: the image's content identity
    image_id: str = ""  # podman's image id in the service user's storage


def _noop(_: str) -> None:
    pass


def cache_key(
    suite: str, packages: Sequence[str], mirror: str | None, variant: str = "minbase"
) -> str:
    """What the rootfs depends on; equal keys reuse the cached tarball."""
    spec = {
        "suite": suite,
        "variant": variant,
        "packages": sorted(set(packages)),
        "mirror": mirror or "",
        "recipe": RECIPE_VERSION,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def recipe_digest(
    suite: str = "bookworm", packages: Sequence[str] = BASE_PACKAGES, variant: str = "minbase"
) -> str:
    """The base image's pin for blueprints: sha256 of its recipe (see RECIPE_LABEL)."""
    spec = {
        "suite": suite,
        "variant": variant,
        "packages": sorted(set(packages)),
        "recipe": RECIPE_VERSION,
    }
    return "sha256:" + hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def tag_for(digest: str) -> str:
    return f"{REPOSITORY}:{digest.removeprefix('sha256:')[:12]}"


@contextlib.contextmanager
def build_lock(path: Path) -> Iterator[None]:
    # Two builders (CLI + tests, parallel test workers) must not debootstrap into the same cache.
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _run_streaming(argv: list[str], progress: Progress, what: str) -> None:
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
    )
    assert proc.stdout is not None
    tail: list[str] = []
    for line in proc.stdout:
        line = line.rstrip()
        if line:
            progress(f"{what}: {line}")
            tail = [*tail[-19:], line]
    if proc.wait() != 0:
        raise ImageBuildError(f"{what} failed (exit {proc.returncode}):\n" + "\n".join(tail))


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def harden_rootfs(root: Path) -> None:
    """Make a debootstrap tree fit to be a sandbox root (pure filesystem edits, no chroot)."""
    # No setuid/setgid programs: su, passwd, mount, ... are privilege-escalation surface, and
    # no-new-privileges alone would only neuter them at exec time.
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            p = Path(dirpath, name)
            st = p.lstat()
            if not p.is_symlink() and st.st_mode & 0o6000:
                os.chmod(p, st.st_mode & ~0o6000 & 0o7777)
    for pattern in _PRUNE_GLOBS:
        for p in root.glob(pattern):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink(missing_ok=True)
    # Device nodes cannot be created in a rootless store and podman provides /dev itself.
    for sub in ("dev", "proc", "sys", "run", "tmp"):
        d = root / sub
        if d.is_dir():
            for child in d.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
    (root / "tmp").chmod(0o1777)
    _add_agent_user(root)
    for mp in MOUNTPOINTS:
        (root / mp.lstrip("/")).mkdir(parents=True, exist_ok=True)
    os.chown(root / "workspace", AGENT_UID, AGENT_GID)
    # No root password anywhere; shadow stays root:shadow 0640 (debootstrap's default).
    shadow = root / "etc/shadow"
    lines = shadow.read_text().splitlines()
    shadow.write_text(
        "\n".join(
            ":".join([f[0], "*", *f[2:]]) if (f := ln.split(":"))[0] == "root" else ln
            for ln in lines
        )
        + "\n"
    )
    # An empty machine-id: every container gets its own instead of sharing the build's.
    mid = root / "etc/machine-id"
    if mid.exists():
        mid.write_text("")


def _add_agent_user(root: Path) -> None:
    def append_once(rel: str, name: str, line: str) -> None:
        path = root / rel
        text = path.read_text() if path.exists() else ""
        if not any(ln.split(":", 1)[0] == name for ln in text.splitlines()):
            path.write_text(text + ("" if text.endswith("\n") or not text else "\n") + line + "\n")

    append_once("etc/group", "agent", f"agent:x:{AGENT_GID}:")
    append_once("etc/gshadow", "agent", "agent:!::")
    append_once(
        "etc/passwd", "agent", f"agent:x:{AGENT_UID}:{AGENT_GID}:sandbox agent:{AGENT_HOME}:/bin/sh"
    )
    append_once("etc/shadow", "agent", "agent:!:19000:0:99999:7:::")
    home = root / AGENT_HOME.lstrip("/")
    home.mkdir(parents=True, exist_ok=True)
    os.chown(home, AGENT_UID, AGENT_GID)
    home.chmod(0o750)


def build_rootfs_tarball(
    workdir: Path,
    *,
    suite: str = "bookworm",
    mirror: str | None = None,
    packages: Sequence[str] = BASE_PACKAGES,
    progress: Progress = _noop,
) -> tuple[Path, str]:
    """The hardened rootfs as a tarball in `workdir` (cached); returns (path, sha256 digest)."""
    workdir = Path(workdir)
    key = cache_key(suite, packages, mirror)
    tarball = workdir / f"rootfs-{suite}-{key}.tar"
    meta = tarball.with_suffix(".json")
    with build_lock(workdir / ".build.lock"):
        if tarball.exists() and meta.exists():
            digest = json.loads(meta.read_text())["digest"]
            progress(f"rootfs: cached {tarball.name} ({digest[:19]})")
            return tarball, digest
        if os.geteuid() != 0:
            raise ImageBuildError(
                "building the base rootfs needs root: debootstrap creates device nodes and "
                "root-owned files; run `sudo appliance image build` (or load a saved archive "
                "with `appliance image load`)"
            )
        if shutil.which("debootstrap") is None:
            raise ImageBuildError("debootstrap is not installed (scripts/setup.sh installs it)")
        root = workdir / f"rootfs-{suite}-{key}.d"
        if root.exists():
            shutil.rmtree(root)  # a half-finished earlier run
        argv = [
            "debootstrap",
            "--variant=minbase",
            f"--include={','.join(sorted(set(packages)))}",
            suite,
            str(root),
        ]
        if mirror:
            argv.append(mirror)
        t0 = time.monotonic()
        progress(f"rootfs: debootstrap {suite} (minbase + {', '.join(sorted(set(packages)))})")
        try:
            _run_streaming(argv, progress, "debootstrap")
            progress("rootfs: hardening (setuid bits, caches, agent user, mountpoints)")
            harden_rootfs(root)
            tmp = tarball.with_suffix(".tar.part")
            # Sorted, fixed mtime-free metadata is not needed: the cached file *is* the identity.
            _run_streaming(
                ["tar", "--numeric-owner", "--xattrs", "-C", str(root), "-cf", str(tmp), "."],
                progress,
                "tar",
            )
            digest = _sha256_file(tmp)
            tmp.rename(tarball)
            meta.write_text(json.dumps({"digest": digest, "suite": suite, "key": key}) + "\n")
            # Older recipes' tarballs for this suite are dead weight (~150 MB each).
            for old in workdir.glob(f"rootfs-{suite}-*.tar"):
                if old != tarball:
                    old.unlink(missing_ok=True)
                    old.with_suffix(".json").unlink(missing_ok=True)
        finally:
            shutil.rmtree(root, ignore_errors=True)
        size_mb = tarball.stat().st_size / 1e6
        progress(f"rootfs: {tarball.name} {size_mb:.0f} MB in {time.monotonic() - t0:.0f} s")
        return tarball, digest


def find_image(client: PodmanClient, digest: str, recipe: str | None = None) -> ImageRef | None:
    """The imported image of this rootfs digest (and, if given, carrying this recipe label)."""
    tag = tag_for(digest)
    try:
        img = client.images.get(tag)
    except ImageNotFound:
        return None
    if recipe is not None and (img.labels or {}).get(RECIPE_LABEL) != recipe:
        return None  # imported before recipe labels: import again (the tarball is cached)
    return ImageRef(tag=tag, digest=digest, image_id=img.id)


def _import_tarball(client: PodmanClient, tarball: Path, digest: str, recipe: str) -> str:
    changes = [
        f"LABEL {DIGEST_LABEL}={digest}",
        f"LABEL {RECIPE_LABEL}={recipe}",
        f"USER {AGENT_UID}:{AGENT_GID}",
        "WORKDIR /workspace",
        "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        'CMD ["/bin/sh"]',
    ]
    # podman-py has no import helper; the libpod endpoint streams the file (Content-Length set).
    with open(tarball, "rb") as fh:
        resp = client.api.post(
            "/images/import",
            params={"reference": tag_for(digest), "changes": changes, "message": "appliance-base"},
            data=fh,
            headers={"Content-Type": "application/x-tar"},
            timeout=600,
        )
    if resp.status_code >= 300:
        raise ImageBuildError(f"podman import failed ({resp.status_code}): {resp.text.strip()}")
    return str(resp.json().get("Id", ""))


def build_base_image(
    client: PodmanClient,
    *,
    workdir: Path,
    suite: str = "bookworm",
    mirror: str | None = None,
    packages: Sequence[str] = BASE_PACKAGES,
    progress: Progress = _noop,
) -> ImageRef:
    """Build (or reuse) the base image in the storage behind `client` and tag it
    `localhost/appliance-base:<digest12>` and `:latest`."""
    tarball, digest = build_rootfs_tarball(
        workdir, suite=suite, mirror=mirror, packages=packages, progress=progress
    )
    recipe = recipe_digest(suite, packages)
    ref = find_image(client, digest, recipe)
    if ref is None:
        t0 = time.monotonic()
        progress(f"image: importing {tarball.name} into the service user's storage")
        _import_tarball(client, tarball, digest, recipe)
        ref = find_image(client, digest, recipe)
        if ref is None:
            raise ImageBuildError(f"import reported success but {tag_for(digest)} is missing")
        progress(f"image: imported {ref.tag} in {time.monotonic() - t0:.1f} s")
    else:
        progress(f"image: {ref.tag} already present")
    client.images.get(ref.image_id).tag(REPOSITORY, "latest")
    return ref


def save_image(
    client: PodmanClient, ref: ImageRef | str, path: Path, *, progress: Progress = _noop
) -> Path:
    """Write the image to an OCI archive (`podman save --format oci-archive`)."""
    name = ref.tag if isinstance(ref, ImageRef) else ref
    path = Path(path)
    tmp = path.with_name(path.name + ".part")
    resp = client.api.get(
        f"/images/{name}/get", params={"format": "oci-archive"}, stream=True, timeout=600
    )
    try:
        if resp.status_code >= 300:
            raise ImageBuildError(f"save {name} failed ({resp.status_code}): {resp.text.strip()}")
        with open(tmp, "wb") as out:
            for chunk in resp.iter_content(1 << 20):
                out.write(chunk)
    finally:
        resp.close()
    tmp.rename(path)
    progress(f"image: saved {name} to {path} ({path.stat().st_size / 1e6:.0f} MB)")
    return path


def load_image(client: PodmanClient, path: Path, *, progress: Progress = _noop) -> ImageRef:
    """Load an OCI archive written by `save_image` and re-tag it by digest and `:latest`."""
    path = Path(path)
    if not path.is_file():
        raise ImageBuildError(f"{path}: no such archive")
    with open(path, "rb") as fh:
        resp = client.api.post(
            "/images/load",
            data=fh,
            headers={"Content-Type": "application/x-tar"},
            timeout=600,
        )
    if resp.status_code >= 300:
        raise ImageBuildError(f"load {path} failed ({resp.status_code}): {resp.text.strip()}")
    names: list[str] = resp.json().get("Names") or []
    if not names:
        raise ImageBuildError(f"{path}: the archive held no image")
    img = client.images.get(names[0])
    labels: dict[str, Any] = img.labels or {}
    if "org.appliance.layer" in labels:
        # A layer on top of the base (it inherits the base's labels): keep the archive's own
        # name; the base tags below belong to the base image alone.
        progress(f"image: loaded {names[0]} from {path}")
        return ImageRef(tag=names[0], digest=str(labels.get(RECIPE_LABEL, "")), image_id=img.id)
    digest = str(labels.get(DIGEST_LABEL, ""))
    if not digest:
        raise ImageBuildError(f"{path}: not an appliance base image (no {DIGEST_LABEL} label)")
    tag = tag_for(digest)
    repo, _, version = tag.rpartition(":")
    try:
        img.tag(repo, version)
        img.tag(REPOSITORY, "latest")
    except APIError as exc:
        raise ImageBuildError(f"tagging {tag}: {exc}") from exc
    progress(f"image: loaded {tag} from {path}")
    return ImageRef(tag=tag, digest=digest, image_id=img.id)
