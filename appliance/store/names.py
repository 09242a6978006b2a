"""The rules for what names the store's keys and operators take, and the errors for a name in
use: light (no SQLite, no gateway), so the CLI checks a name before its round trip and the
store and the control plane check the same rule again."""

from __future__ import annotations

from collections.abc import Iterable

from appliance.errors import ConfigError, ConflictError
from inference.ports import SCOPES, OwnerKind, Scope
from sandbox.names import RESERVED, RULE, SANDBOX_KEY_PREFIX, InvalidNameError, check_name, is_valid


class KeyNameError(InvalidNameError, ConfigError):
    """A key name breaks the rule (sandbox/names.py)."""

    hint = f"key names are {RULE}; `appliance keys list` shows the used ones"


class KeyExistsError(ConflictError):
    """A live key already has this name (two creates of one name: one wins)."""

    hint = "`appliance keys list` shows the used names; revoke the old key or pick another"


class KeyScopeError(ConfigError):
    """A key scope that the gateway does not know, or one a sandbox's key may not have."""

    hint = f"known scopes: {', '.join(SCOPES)}"


class OperatorNameError(InvalidNameError, ConfigError):
    """An operator name breaks the name rule (sandbox/names.py)."""

    hint = InvalidNameError.hint + "; `appliance operators list` shows the used ones"


class OperatorExistsError(ConflictError):
    """A live operator already has this name."""

    hint = "`appliance operators list` shows the used names; revoke the old one or pick another"


def check_key_name(name: str, owner_kind: str) -> str:
    """A key follows the rule; a sandbox's own key is `sandbox-` + a sandbox name (so the
    longest sandbox name still has a key)."""
    rest = name.removeprefix(SANDBOX_KEY_PREFIX) if isinstance(name, str) else name
    if owner_kind == "sandbox" and rest != name:
        if is_valid(rest):
            return name
        if rest in RESERVED:  # no sandbox has that name: nor does a sandbox's key
            return check_name(rest, "sandbox key", KeyNameError)
    return check_name(name, "key", KeyNameError)


def check_operator_name(name: str) -> str:
    return check_name(name, "operator", OperatorNameError)


def check_scopes(scopes: Iterable[str], owner_kind: OwnerKind) -> tuple[Scope, ...]:
    """The scopes sorted and without repeats, or KeyScopeError (the CLI checks this first)."""
    if isinstance(scopes, str):
        raise TypeError("scopes must be a list of names, not a string")
    names = tuple(sorted(set(scopes)))
    for name in names:
        if name not in SCOPES:
            raise KeyScopeError(f"unknown key scope {name!r}")
    if names and owner_kind == "sandbox":  # the proxy injects a sandbox's key for the agent
        raise KeyScopeError("a sandbox's key takes no scopes: the agent would hold them")
    return names  # type: ignore[return-value]
