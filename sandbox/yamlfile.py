"""YAML in with line numbers out: every key path remembers the `file:line` it came from.

Used by the appliance's layered config, sandbox policies and blueprints, so that a bad value is
reported as `path:line: what is wrong` rather than as a bare pydantic error. It raises YamlError;
callers turn that into their own error type.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

KeyPath = tuple[str | int, ...]
Provenance = dict[KeyPath, str]  # key path -> "file:line" (or "env NAME", "flag --x")


class YamlError(ValueError):
    """A YAML file or value is invalid; the message starts with `path:line:` where known."""


def _walk(node: yaml.Node, path: KeyPath, source: str, out: Provenance) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key_path = (*path, str(key_node.value))
            out[key_path] = f"{source}:{key_node.start_mark.line + 1}"
            _walk(value_node, key_path, source, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out[(*path, i)] = f"{source}:{item.start_mark.line + 1}"
            _walk(item, (*path, i), source, out)


def parse_yaml(text: str, source: str) -> tuple[dict[str, Any], Provenance]:
    """Parse one YAML document that must be a mapping; an empty document is `{}`."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text) if node is not None else {}
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        raise YamlError(f"{where}: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise YamlError(f"{source}: {exc}") from None
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        line = node.start_mark.line + 1 if node is not None else 1
        raise YamlError(f"{source}:{line}: expected a mapping at the top level")
    provenance: Provenance = {}
    _walk(node, (), source, provenance)
    return data, provenance


def load_yaml(path: Path) -> tuple[dict[str, Any], Provenance]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise YamlError(f"{path}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:  # a config error like any other, not a crash
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise YamlError(
            f"{path}: not UTF-8 (line {line}: byte 0x{exc.object[exc.start]:02x})"
        ) from None
    return parse_yaml(text, str(path))


def deep_merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """Merge `top` over `base`: mappings merge key by key, everything else is replaced."""
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def locate(loc: KeyPath, provenance: Provenance) -> str | None:
    """The source of the longest prefix of `loc` that has one."""
    for end in range(len(loc), 0, -1):
        where = provenance.get(tuple(loc[:end]))
        if where:
            return where
    return None


def validation_message(exc: ValidationError, provenance: Provenance, fallback: str) -> str:
    """One line per pydantic error, each starting with where the bad value came from."""
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        where = locate(loc, provenance) or fallback
        dotted = ".".join(str(p) for p in loc) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")  # pydantic's prefix for ValueError
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        lines.append(f"{where}: {dotted}: {msg}")
    return "\n".join(lines)
