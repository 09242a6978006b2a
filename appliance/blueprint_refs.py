"""Blueprint references (`name`, `name@version`, or a file path) to blueprints, with the
blueprints package's errors turned into the appliance's (one line, its exit code)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from appliance import __version__
from appliance.errors import ConfigError, NotFoundError
from blueprints.catalog import BlueprintError, BlueprintNotFound, Catalog, load_blueprint
from blueprints.model import Blueprint, semver_key


@contextmanager
def blueprint_errors() -> Iterator[None]:
    try:
        yield
    except BlueprintNotFound as exc:
        raise NotFoundError(str(exc), hint="`appliance blueprint list`") from None
    except BlueprintError as exc:
        raise ConfigError(str(exc), hint="fix the blueprint at the line named") from None


def resolve_blueprint(catalog: Catalog, ref: str) -> Blueprint:
    """A blueprint from the catalog (`name[@version]`) or from a file path."""
    with blueprint_errors():
        if ref.endswith((".yaml", ".yml")) or "/" in ref:
            return load_blueprint(Path(ref))
        return catalog.get(ref)


def check_compatible(blueprint: Blueprint) -> None:
    if semver_key(blueprint.min_appliance_version) > semver_key(__version__):
        raise ConfigError(
            f"{blueprint.ref} needs appliance >= {blueprint.min_appliance_version} "
            f"(this is {__version__})",
            hint="upgrade the appliance or pick an older blueprint version",
        )
