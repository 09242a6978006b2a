"""The offline bundle: everything a host with no network needs, in one checksummed directory.

    BUNDLE/
      manifest.json   what is inside (format, versions, arch, sections)
      SHA256SUMS      every other file, coreutils format: `sha256sum --check` works without us
      install.sh      bootstrap without the appliance: venv + wheels, then `bundle install`
      wheels/         the pinned wheelhouse (wheelhouse.py) + requirements.txt
      debs/           the host packages' dependency closure as a flat apt repository (optional)
      images/         the sandbox images the blueprints pin, as OCI archives
      blueprints/     the operator's own blueprints (the shipped ones are inside the wheel)
      models/         model weights (optional)
      ansible/        the provisioning collection, so site.yml travels with the bundle

`create` builds into `BUNDLE.partial` and renames at the end: a failed run leaves no half bundle
that looks whole. `verify` checks every file against SHA256SUMS and refuses files it does not
list, links and paths outside the bundle. `install` verifies first, then installs what is not
already there, so running it twice changes nothing the second time.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

from appliance import __version__
from appliance.config import ApplianceConfig
from appliance.errors import ApplianceError, ConfigError
from sandbox.lifecycle.owned_paths import owned_child, remove_owned

FORMAT = 1
MANIFEST = "manifest.json"
SUMS = "SHA256SUMS"
INSTALL_SH = "install.sh"
DEFAULT_VENV = Path("/opt/appliance/venv")
_SKIP_COPY = shutil.ignore_patterns("__pycache__", "*.pyc", ".ansible", ".cache")

Progress = Callable[[str], None]


class BundleError(ApplianceError):
    """The bundle is incomplete, altered or cannot be made here."""

    hint = "make a new bundle on a connected machine: `appliance bundle create --out DIR`"


def _noop(_: str) -> None:
    pass


def _sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def dpkg_arch() -> str:
    try:
        return subprocess.run(
            ["dpkg", "--print-architecture"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())


def python_tag() -> str:
    return f"cp{sys.version_info.major}{sys.version_info.minor}"


# -- create ------------------------------------------------------------------------------------


@dataclass
class CreateOptions:
    extras: tuple[str, ...] = ("embedded",)
    debs: bool = True
    images: bool = True
    blueprint_dirs: tuple[Path, ...] = ()
    models: tuple[Path, ...] = ()
    ansible: bool = True
    tar: bool = False


def _ansible_source() -> Path | None:
    tree = Path(__file__).resolve().parents[2] / "ansible"
    return tree if (tree / "galaxy.yml").is_file() else None


def _copy(src: Path, dest: Path) -> None:
    if src.is_dir():
        shutil.copytree(src, dest, ignore=_SKIP_COPY, symlinks=False)
    else:
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest)


def _bundle_blueprints(work: Path, dirs: Sequence[Path]) -> tuple[list[dict[str, Any]], list[Any]]:
    """Copy the operator's blueprints; return (manifest rows, every blueprint's image pin)."""
    from blueprints.catalog import BUILTIN, Catalog, load_blueprint

    rows: list[dict[str, Any]] = []
    pins: list[Any] = []
    for entry in Catalog(list(dirs)).entries():
        blueprint = load_blueprint(entry.path)
        shipped = entry.path.is_relative_to(BUILTIN)
        if not shipped:
            _copy(entry.path.parent, work / "blueprints" / entry.name / entry.version)
        rows.append(
            {
                "ref": blueprint.ref,
                "digest": blueprint.digest(),
                "shipped": shipped,
                "image": blueprint.image.ref,
            }
        )
        if blueprint.image.digest not in {p.digest for p in pins}:
            pins.append(blueprint.image)
    return rows, pins


def _podman(config: ApplianceConfig) -> Any:
    from sandbox.lifecycle.podman_service import PodmanService

    return PodmanService(user=config.sandbox.service_user).start()


def _bundle_images(
    client: Any, work: Path, pins: Sequence[Any], progress: Progress
) -> list[dict[str, str]]:
    """Each pinned image (built from its recipe when missing) saved as an OCI archive."""
    from appliance.packaging.images import resolve_image
    from sandbox.images.base import save_image

    rows = []
    for pin in pins:
        image_id = resolve_image(client, pin, progress)
        image = client.images.get(image_id)
        tag = next((t for t in image.tags if not t.endswith(":latest")), None) or image.tags[0]
        rel = f"images/{pin.name.rsplit('/', 1)[-1]}-{pin.digest.removeprefix('sha256:')[:12]}.tar"
        (work / "images").mkdir(exist_ok=True)
        save_image(client, tag, work / rel, progress=progress)
        rows.append({"file": rel, "tag": tag, "pin": pin.digest, "image_id": image_id})
    return rows


def _install_sh() -> str:
    return f"""#!/bin/sh
# Install the appliance from this bundle on a host with no network (no Ansible needed):
#   sudo ./install.sh [VENV [BUNDLE-INSTALL-OPTIONS...]]     (VENV default {DEFAULT_VENV})
# Checks every file first, installs the pinned wheels, links the CLI (CLI_LINK, empty for
# none), then runs `appliance bundle install` (the appliance's own wheel if it changed, images,
# blueprints, models).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
venv=${{1:-{DEFAULT_VENV}}}
[ "$#" -gt 0 ] && shift
link=${{CLI_LINK-/usr/local/bin/appliance}}
(cd "$here" && sha256sum --check --strict --quiet {SUMS})
[ -x "$venv/bin/python" ] || /usr/bin/python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-index --no-deps \\
  --find-links "$here/wheels" -r "$here/wheels/requirements.txt"
[ -z "$link" ] || ln -sf "$venv/bin/appliance" "$link"
exec "$venv/bin/appliance" bundle install "$here" --venv "$venv" "$@"
"""


def write_sums(root: Path) -> None:
    lines = [f"{_sha256(root / rel)}  {rel}" for rel in sorted(_files(root)) if rel != SUMS]
    (root / SUMS).write_text("\n".join(lines) + "\n")


def _files(root: Path) -> list[str]:
    return [p.relative_to(root).as_posix() for p in root.rglob("*") if not p.is_dir()]


def create_bundle(
    out: Path, options: CreateOptions, config: ApplianceConfig, progress: Progress = _noop
) -> dict[str, Any]:
    """Write the bundle directory `out` (and `out.tar` with options.tar); returns the manifest."""
    from appliance.packaging.wheelhouse import build_wheelhouse

    out = out.resolve()
    if out.exists():
        raise BundleError(f"{out} exists; give a new directory", hint="remove it or pick another")
    work = out.with_name(out.name + ".partial")
    remove_owned(out.parent, work)
    work.mkdir(parents=True)
    sections: dict[str, Any] = {}
    try:
        wheelhouse = build_wheelhouse(work / "wheels", extras=options.extras, progress=progress)
        sections["wheels"] = {"extras": list(options.extras), "pins": list(wheelhouse.pins)}
        if options.debs:
            from appliance.packaging.host_packages import (
                HOST_PACKAGES,
                download_closure,
                write_index,
            )

            debs = download_closure(work / "debs", HOST_PACKAGES, progress)
            write_index(work / "debs")
            sections["debs"] = {"packages": list(HOST_PACKAGES), "count": len(debs)}
        rows, pins = _bundle_blueprints(work, [*config.blueprints.dirs, *options.blueprint_dirs])
        sections["blueprints"] = rows
        if options.images:
            sections["images"] = _bundle_images(_podman(config), work, pins, progress)
        models = []
        for src in options.models:
            if not src.exists():
                raise BundleError(f"{src}: no such model file or directory", hint=None)
            _copy(src, work / "models" / src.name)
            models.append({"name": src.name, "dir": src.is_dir()})
            progress(f"models: copied {src}")
        sections["models"] = models
        ansible = _ansible_source() if options.ansible else None
        if ansible is not None:
            _copy(ansible, work / "ansible")
        sections["ansible"] = ansible is not None
        (work / INSTALL_SH).write_text(_install_sh())
        (work / INSTALL_SH).chmod(0o755)
        manifest = {
            "format": FORMAT,
            "appliance_version": __version__,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "arch": dpkg_arch(),
            "python": python_tag(),
            "sections": sections,
        }
        (work / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        progress("sums: hashing every file")
        write_sums(work)
        work.rename(out)
    except BaseException:
        remove_owned(out.parent, work)
        raise
    if options.tar:
        tarball = out.with_name(out.name + ".tar")
        with tarfile.open(tarball, "w") as tar:
            tar.add(out, arcname=out.name)
        progress(f"tar: {tarball} ({tarball.stat().st_size / 1e6:.0f} MB)")
    return manifest


# -- verify ------------------------------------------------------------------------------------


@dataclass
class Verification:
    root: Path
    checked: int = 0
    bad: list[str] = field(default_factory=list)  # "path: why"
    digests: dict[str, str] = field(default_factory=dict)  # relative path -> sha256, as listed

    @property
    def ok(self) -> bool:
        return not self.bad


def verify_bundle(root: Path) -> Verification:
    """Every listed file present with its checksum, nothing unlisted, no links."""
    result = Verification(root=root)
    sums = root / SUMS
    if not sums.is_file():
        raise BundleError(f"{root}: not a bundle (no {SUMS})")
    listed: dict[str, str] = {}
    for n, line in enumerate(sums.read_text().splitlines(), 1):
        digest, sep, rel = line.partition("  ")
        path = PurePosixPath(rel)
        if not sep or len(digest) != 64 or path.is_absolute() or ".." in path.parts:
            raise BundleError(f"{sums}:{n}: not a `<sha256>  <relative path>` line")
        listed[rel] = digest
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_symlink():
            result.bad.append(f"{rel}: a symbolic link")
        elif p.is_file() and rel != SUMS and rel not in listed:
            result.bad.append(f"{rel}: not listed in {SUMS}")
    result.digests = listed
    for rel, digest in listed.items():
        path = root / rel
        if not path.is_file() or path.is_symlink():
            result.bad.append(f"{rel}: missing")
        elif _sha256(path) != digest:
            result.bad.append(f"{rel}: checksum mismatch")
        else:
            result.checked += 1
    return result


def read_manifest(root: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise BundleError(f"{root / MANIFEST}: {exc}") from None
    if manifest.get("format") != FORMAT:
        raise BundleError(f"{root}: bundle format {manifest.get('format')!r}, expected {FORMAT}")
    return manifest


@contextlib.contextmanager
def opened(path: Path) -> Iterator[Path]:
    """The bundle directory itself, or a tarball's contents in a fresh directory beside it
    (removed afterwards: what install copies out of it stays where it was copied)."""
    if path.is_dir():
        yield path
        return
    if not (path.is_file() and path.name.endswith(".tar")):
        raise BundleError(f"{path}: no such bundle directory or .tar", hint=None)
    scratch = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.resolve().parent))
    try:
        yield unpack(path, scratch)
    finally:
        remove_owned(scratch.parent, scratch)


def unpack(tarball: Path, dest: Path) -> Path:
    """Extract a bundle tarball into `dest` after checking every member is a plain file or a
    directory under one top directory (this Python's tarfile has no extraction filter)."""
    with tarfile.open(tarball) as tar:
        members = tar.getmembers()
        tops = {PurePosixPath(m.name).parts[0] for m in members if m.name}
        for m in members:
            parts = PurePosixPath(m.name).parts
            if m.name.startswith("/") or ".." in parts or not (m.isfile() or m.isdir()):
                raise BundleError(f"{tarball}: refusing member {m.name!r}")
        if len(tops) != 1:
            raise BundleError(f"{tarball}: expected one top directory, found {sorted(tops)}")
        tar.extractall(dest)  # every member was checked above
    return dest / tops.pop()


# -- install -----------------------------------------------------------------------------------


@dataclass
class InstallOptions:
    venv: Path | None = None  # default: the environment running this appliance
    wheels: bool = True
    images: bool = True
    models: bool = True
    blueprints: bool = True


@dataclass
class InstallReport:
    root: Path
    steps: dict[str, str] = field(default_factory=dict)  # step -> what happened
    changed: bool = False

    def note(self, step: str, what: str, changed: bool) -> None:
        self.steps[step] = what
        self.changed = self.changed or changed


def _check_host(manifest: dict[str, Any]) -> None:
    want = (manifest.get("arch"), manifest.get("python"))
    have = (dpkg_arch(), python_tag())
    if want != have:
        raise BundleError(
            f"this bundle is for {want[0]}/{want[1]}, this host is {have[0]}/{have[1]}",
            hint="create the bundle on a connected machine of the same architecture and Python",
        )


def _install_wheels(root: Path, venv: Path, digests: dict[str, str], report: InstallReport) -> None:
    from appliance.packaging.wheelhouse import install_argv

    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run(["/usr/bin/python3", "-m", "venv", str(venv)], check=True)
    before = _freeze(python)
    _pip_ok(install_argv(str(python), root / "wheels"), root)
    changed = _freeze(python) != before
    # pip keeps an installed gpu-appliance of the same version even when this bundle's wheel
    # holds other code: the wheel's own hash, stamped in the venv, decides.
    wheel = next((root / "wheels").glob("gpu_appliance-*.whl"))
    stamp = venv / ".appliance-wheel.sha256"
    digest = digests[wheel.relative_to(root).as_posix()]  # verified before install
    if not stamp.is_file() or stamp.read_text().strip() != digest:
        pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check", "--no-index"]
        _pip_ok([*pip, "--no-deps", "--force-reinstall", str(wheel)], root)
        stamp.write_text(digest + "\n")
        changed = True
    report.note("wheels", f"{'installed into' if changed else 'already in'} {venv}", changed)


def _pip_ok(argv: list[str], root: Path) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        raise BundleError(f"pip install from {root / 'wheels'} failed: {tail}")


def _freeze(python: Path) -> str:
    return subprocess.run(
        [str(python), "-m", "pip", "freeze", "--all", "--disable-pip-version-check"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout


def _install_images(
    client: Any, root: Path, rows: Iterable[dict[str, str]], report: InstallReport
) -> None:
    from appliance.packaging.images import find_pinned
    from sandbox.images.base import load_image

    loaded = []
    for row in rows:
        if find_pinned(client, row["pin"]) is None:
            load_image(client, root / row["file"])
            loaded.append(row["tag"])
            if find_pinned(client, row["pin"]) is None:
                raise BundleError(f"{row['file']}: loaded, but no image carries {row['pin']}")
    what = f"loaded {', '.join(loaded)}" if loaded else f"{len(rows)} image(s) already present"
    report.note("images", what, bool(loaded))


def _sync_tree(root: Path, section: str, dest: Path, digests: dict[str, str]) -> bool:
    """Copy the bundle's files under `section/` to dest where missing or different (compared
    with the digests verify just checked); True if anything was copied."""
    changed = False
    for rel, digest in sorted(digests.items()):
        if not rel.startswith(f"{section}/"):
            continue
        # strictly inside dest, its parents resolved: a symlinked directory there is refused
        target = owned_child(dest, dest / rel.removeprefix(f"{section}/"))
        if target.is_file() and not target.is_symlink() and _sha256(target) == digest:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        owned_child(dest, target)  # again, now that the parents exist
        if target.is_symlink():
            target.unlink()  # replaced, never written through
        shutil.copy2(root / rel, target)
        changed = True
    return changed


def install_bundle(
    root: Path, options: InstallOptions, config: ApplianceConfig, progress: Progress = _noop
) -> InstallReport:
    verification = verify_bundle(root)
    if not verification.ok:
        raise BundleError(
            f"{root}: {len(verification.bad)} file(s) fail verification, installing nothing: "
            + "; ".join(verification.bad[:5])
        )
    manifest = read_manifest(root)
    _check_host(manifest)
    report = InstallReport(root=root)
    sections = manifest["sections"]
    if options.wheels:
        progress("wheels: pip install --no-index --no-deps")
        _install_wheels(root, options.venv or Path(sys.prefix), verification.digests, report)
    if options.images and sections.get("images"):
        progress("images: loading into the service user's Podman")
        _install_images(_podman(config), root, sections["images"], report)
    if options.blueprints and (root / "blueprints").is_dir():
        if not config.blueprints.dirs:
            raise ConfigError(
                "the bundle carries operator blueprints but `blueprints.dirs` is not set",
                hint="add a directory to blueprints.dirs in the config, or pass --no-blueprints",
            )
        changed = _sync_tree(root, "blueprints", config.blueprints.dirs[0], verification.digests)
        report.note("blueprints", f"into {config.blueprints.dirs[0]}", changed)
    if options.models and (root / "models").is_dir():
        models_dir = config.resolved_models_dir
        changed = _sync_tree(root, "models", models_dir, verification.digests)
        report.note("models", f"into {models_dir}", changed)
    return report
