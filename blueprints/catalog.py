"""The blueprint catalog: `blueprints/<name>/<version>/blueprint.yaml`, plus operators' own dirs.

A reference is `name` (the newest version) or `name@version`. The directory names must match the
file's `name` and `version`, so what `list` shows is what `get` loads. The same name@version in two
places must be the same blueprint (same digest): a user dir cannot quietly replace a shipped one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from blueprints.errors import BlueprintError, BlueprintNotFound
from blueprints.model import SEMVER, Blueprint, semver_key
from sandbox.yamlfile import Provenance, YamlError, load_yaml, parse_yaml, validation_message

BUILTIN = Path(__file__).resolve().parent
FILENAME = "blueprint.yaml"


def load_blueprint(path: Path) -> Blueprint:
    try:
        data, provenance = load_yaml(path)
    except YamlError as exc:
        raise BlueprintError(str(exc)) from None
    return _validate(data, provenance, str(path))


def parse_blueprint(text: str, source: str) -> Blueprint:
    """A blueprint from its YAML text (as a client sent it); errors name `source`:line. The same
    blueprint, and digest, as `load_blueprint` of a file holding that text."""
    try:
        data, provenance = parse_yaml(text, source)
    except YamlError as exc:
        raise BlueprintError(str(exc)) from None
    return _validate(data, provenance, source)


def _validate(data: dict[str, Any], provenance: Provenance, source: str) -> Blueprint:
    try:
        return Blueprint.model_validate(data)
    except ValidationError as exc:
        raise BlueprintError(validation_message(exc, provenance, source)) from None


def parse_ref(ref: str) -> tuple[str, str | None]:
    name, _, version = ref.partition("@")
    if version and not SEMVER.match(version):
        raise BlueprintError(f"{ref!r}: the version after '@' must be MAJOR.MINOR.PATCH")
    return name, version or None


@dataclass(frozen=True)
class Entry:
    name: str
    version: str
    path: Path


class Catalog:
    def __init__(self, user_dirs: list[Path] | None = None, builtin: Path = BUILTIN) -> None:
        self.dirs = [builtin, *(user_dirs or [])]

    def entries(self) -> list[Entry]:
        """Every name@version on disk, newest version first per name (not yet validated)."""
        found: dict[tuple[str, str], Entry] = {}
        for root in self.dirs:
            for path in sorted(root.glob(f"*/*/{FILENAME}")):
                name, version = path.parent.parent.name, path.parent.name
                if not SEMVER.match(version):
                    continue
                first = found.setdefault((name, version), Entry(name, version, path))
                if first.path != path and _digest(first.path) != _digest(path):
                    raise BlueprintError(
                        f"{path}: {name}@{version} is also {first.path}, with other contents; "
                        "give the changed blueprint a new version"
                    )
        return sorted(found.values(), key=lambda e: (e.name, _neg(semver_key(e.version))))

    def versions(self, name: str) -> list[str]:
        return [e.version for e in self.entries() if e.name == name]

    def get(self, ref: str) -> Blueprint:
        name, version = parse_ref(ref)
        candidates = [e for e in self.entries() if e.name == name]
        if not candidates:
            known = sorted({e.name for e in self.entries()})
            raise BlueprintNotFound(f"no blueprint named {name!r} (known: {', '.join(known)})")
        if version is not None:
            candidates = [e for e in candidates if e.version == version]
            if not candidates:
                have = ", ".join(self.versions(name))
                raise BlueprintNotFound(f"no version {version} of {name!r} (have: {have})")
        entry = candidates[0]
        blueprint = load_blueprint(entry.path)
        if (blueprint.name, blueprint.version) != (entry.name, entry.version):
            raise BlueprintError(
                f"{entry.path}: says {blueprint.ref} but lives in {entry.name}/{entry.version}/"
            )
        return blueprint


def _digest(path: Path) -> str:
    return load_blueprint(path).digest()


def _neg(key: tuple[int, int, int, int, str]) -> tuple[int, int, int, int, str]:
    # Newest first for the numeric parts; pre-release names are rare enough to sort ascending.
    return (-key[0], -key[1], -key[2], -key[3], key[4])
