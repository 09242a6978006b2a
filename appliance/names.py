"""The one name rule for sandboxes, agents and keys.

A name becomes a directory (`sandboxes/NAME`, `homes/NAME`), a Podman container and label, a
key name (`sandbox-NAME`) and a row in the store, so it must be safe as all of them: 1-63
characters of a-z, 0-9 and '-', starting with a letter or digit (a DNS label's alphabet, no
upper case, no Unicode look-alikes). Checked by every create before anything is written.
"""

from __future__ import annotations

import re

from appliance.errors import ConfigError

NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}", re.ASCII)  # used with fullmatch: no `$` trap
RULE = "1-63 characters of a-z, 0-9 and '-', starting with a letter or digit"
SANDBOX_KEY_PREFIX = "sandbox-"  # a sandbox's key is named `sandbox-NAME`


class InvalidNameError(ConfigError):
    """A sandbox, agent or key name breaks the name rule."""

    hint = f"names are {RULE}, e.g. `web-agent-1`"


def shown(name: str, limit: int = 40) -> str:
    """The name as one printable line: escapes for newlines, NUL and non-ASCII; long ones cut."""
    text = ascii(name)
    return text if len(text) <= limit else text[: limit - 4] + "...'"


def is_valid(name: object) -> bool:
    return isinstance(name, str) and NAME_RE.fullmatch(name) is not None


def check_name(name: str, kind: str, error: type[InvalidNameError] = InvalidNameError) -> str:
    """`name` if it follows the rule, else `error` naming the `kind` (sandbox, agent, key)."""
    if not is_valid(name):
        raise error(f"invalid {kind} name {shown(name)}")  # the rule is in the hint
    return name


class KeyNameError(InvalidNameError):
    """A key name breaks the rule, or a live key already has it."""

    hint = f"key names are {RULE}; `appliance keys list` shows the used ones"


def check_key_name(name: str, owner_kind: str) -> str:
    """A key follows the rule; a sandbox's own key is `sandbox-` + a sandbox name (so the
    longest sandbox name still has a key)."""
    rest = name.removeprefix(SANDBOX_KEY_PREFIX) if isinstance(name, str) else name
    if owner_kind == "sandbox" and rest != name and is_valid(rest):
        return name
    return check_name(name, "key", KeyNameError)
