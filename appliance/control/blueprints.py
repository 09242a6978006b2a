"""Blueprints as the control plane takes them: a catalog reference (`name[@version]`) or a
blueprint's YAML text as a client sent it, never a path. The control plane runs as root: a path
from a caller would be opened as root and its lines quoted back in an error. A file is the CLI's
to read, as the operator; it sends the text. Errors become the appliance's (appliance.errors)."""

from __future__ import annotations

from appliance import __version__
from appliance.errors import ConfigError, blueprint_errors
from blueprints.catalog import Catalog, parse_blueprint
from blueprints.model import Blueprint
from blueprints.resolve import check_compatible, is_path_ref, resolve_pinned, restore_pinned

REF_HINT = "name a catalog blueprint (NAME[@VERSION]); the CLI sends a file's YAML text itself"


def check_ref(ref: str) -> str:
    """`ref` when it is a catalog reference; a path is refused before anything is opened."""
    if is_path_ref(ref):
        raise ConfigError("a blueprint reference is NAME[@VERSION], not a file path", hint=REF_HINT)
    return ref


def resolve(catalog: Catalog, ref: str, compatible: bool = False) -> Blueprint:
    """`name[@version]` from the catalog; `compatible`: one this appliance can run, or an error."""
    check_ref(ref)
    with blueprint_errors():
        blueprint = catalog.get(ref)
        if compatible:
            check_compatible(blueprint, __version__)
        return blueprint


def parse(text: str, source: str) -> Blueprint:
    """A blueprint from a client's YAML text (errors name `source`:line), runnable here."""
    with blueprint_errors():
        blueprint = parse_blueprint(text, source)
        check_compatible(blueprint, __version__)
        return blueprint


def resolve_deployed(catalog: Catalog, name: str, version: str, digest: str) -> Blueprint:
    """A deployment's blueprint, still the one it pinned (same digest) and runnable here."""
    with blueprint_errors():
        blueprint = resolve_pinned(catalog, name, version, digest)
        check_compatible(blueprint, __version__)
        return blueprint


def restore_deployed(canonical: str, digest: str) -> Blueprint:
    """A deployment's blueprint from the copy it stored (same digest), runnable here."""
    with blueprint_errors():
        blueprint = restore_pinned(canonical, digest)
        check_compatible(blueprint, __version__)
        return blueprint
