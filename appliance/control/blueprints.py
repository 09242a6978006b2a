"""Blueprint references resolved for the appliance: the blueprints package's errors turned into
the appliance's (one line, its exit code, a hint), and this appliance's version checked."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from appliance import __version__
from appliance.errors import ApplianceError, ConfigError, NotFoundError
from blueprints.catalog import BlueprintError, BlueprintNotFound, Catalog
from blueprints.model import Blueprint
from blueprints.resolve import (
    BlueprintChanged,
    BlueprintIncompatible,
    check_compatible,
    resolve_blueprint,
    resolve_pinned,
)


@contextmanager
def blueprint_errors() -> Iterator[None]:
    try:
        yield
    except BlueprintNotFound as exc:
        raise NotFoundError(str(exc), hint="`appliance blueprint list`") from None
    except BlueprintIncompatible as exc:
        raise ConfigError(
            str(exc), hint="upgrade the appliance or pick an older blueprint version"
        ) from None
    except BlueprintChanged as exc:
        raise ApplianceError(
            str(exc), hint="blueprint versions must not be edited in place: publish a new version"
        ) from None
    except BlueprintError as exc:
        raise ConfigError(str(exc), hint="fix the blueprint at the line named") from None


def resolve(catalog: Catalog, ref: str, compatible: bool = False) -> Blueprint:
    """`name[@version]` or a file path; `compatible`: one this appliance can run, or an error."""
    with blueprint_errors():
        blueprint = resolve_blueprint(catalog, ref)
        if compatible:
            check_compatible(blueprint, __version__)
        return blueprint


def resolve_deployed(catalog: Catalog, name: str, version: str, digest: str) -> Blueprint:
    """A deployment's blueprint, still the one it pinned (same digest) and runnable here."""
    with blueprint_errors():
        blueprint = resolve_pinned(catalog, name, version, digest)
        check_compatible(blueprint, __version__)
        return blueprint
