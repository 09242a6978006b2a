"""Blueprint references to blueprints: `name` (the newest version), `name@version`, or a file
path; the digest pin a deployment recorded, and the blueprint a deployment stored; and whether
this appliance can run a blueprint.

Errors are the catalog's (BlueprintError and its kinds); the appliance turns them into its own
(one line, its exit code) where it calls these.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError

from blueprints.catalog import Catalog, load_blueprint
from blueprints.errors import BlueprintChanged, BlueprintError, BlueprintIncompatible
from blueprints.model import Blueprint, semver_key


def is_path_ref(ref: str) -> bool:
    """A file path rather than `name[@version]` (names have no '/' and no .yaml suffix)."""
    return ref.endswith((".yaml", ".yml")) or "/" in ref


def resolve_blueprint(catalog: Catalog, ref: str) -> Blueprint:
    """A blueprint from the catalog (`name[@version]`) or from a file path, read by the calling
    process: the CLI's, as the operator. The control plane takes references and text only."""
    if is_path_ref(ref):
        return load_blueprint(Path(ref))
    return catalog.get(ref)


def check_compatible(blueprint: Blueprint, appliance_version: str) -> None:
    if semver_key(blueprint.min_appliance_version) > semver_key(appliance_version):
        raise BlueprintIncompatible(
            f"{blueprint.ref} needs appliance >= {blueprint.min_appliance_version} "
            f"(this is {appliance_version})"
        )


def restore_pinned(canonical: str, digest: str) -> Blueprint:
    """A blueprint from the canonical JSON a deployment stored (`Blueprint.canonical`): the one
    that was deployed (same digest, or BlueprintChanged), needing no catalog entry."""
    try:
        blueprint = Blueprint.model_validate_json(canonical)
    except ValidationError as exc:
        raise BlueprintError(
            f"the stored blueprint (digest {digest[:19]}…) is no longer valid: {_first_error(exc)}"
        ) from None
    if blueprint.digest() != digest:
        raise BlueprintChanged(
            f"the stored copy of {blueprint.ref} does not match its digest {digest[:19]}…"
        )
    return blueprint


def resolve_pinned(catalog: Catalog, name: str, version: str, digest: str) -> Blueprint:
    """name@version as a deployment recorded it: the same digest, or BlueprintChanged."""
    blueprint = catalog.get(f"{name}@{version}")
    if blueprint.digest() != digest:
        raise BlueprintChanged(
            f"{blueprint.ref} changed since it was deployed (digest {digest[:19]}…)"
        )
    return blueprint


def _first_error(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "blueprint"
    return f"{where}: {first['msg']}"
