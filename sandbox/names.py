"""The one name rule for sandboxes, agents and keys.

A name becomes a directory (`sandboxes/NAME`, `homes/NAME`), a Podman container and label, a
key name (`sandbox-NAME`) and a row in the store, so it must be safe as all of them: 1-63
characters of a-z, 0-9 and '-', starting with a letter or digit (a DNS label's alphabet, no
upper case, no Unicode look-alikes). Checked by every create before anything is written.

Reserved: the names of what the control plane keeps beside the sandboxes' own directories in
`sandboxes/` (the supervisor's code, which every sandbox mounts read-only). A sandbox named
`supervisor` would write its config and egress socket into every sandbox's view, and
`sandbox rm supervisor` would delete what every sandbox runs. A new shared entry there must be
added to SHARED_SANDBOX_DIRS (tests/integration/test_hostile_names.py checks the real tree).
"""

from __future__ import annotations

import re

from sandbox.lifecycle.errors import SandboxError

NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}", re.ASCII)  # used with fullmatch: no `$` trap
RULE = "1-63 characters of a-z, 0-9 and '-', starting with a letter or digit"
SANDBOX_KEY_PREFIX = "sandbox-"  # a sandbox's key is named `sandbox-NAME`
SUPERVISOR_DIR = "supervisor"  # <service home>/sandboxes/supervisor: PID 1's code, shared
SHARED_SANDBOX_DIRS = frozenset({SUPERVISOR_DIR})  # every shared entry in `sandboxes/`
RESERVED = SHARED_SANDBOX_DIRS  # one rule for sandboxes, agents and keys: reserved for all


class InvalidNameError(SandboxError):
    """A sandbox, agent or key name breaks the name rule (the appliance: a config error, exit 3)."""

    hint = f"names are {RULE}, e.g. `web-agent-1` (reserved: {', '.join(sorted(RESERVED))})"


def shown(name: str, limit: int = 40) -> str:
    """The name as one printable line: escapes for newlines, NUL and non-ASCII; long ones cut."""
    text = ascii(name)
    return text if len(text) <= limit else text[: limit - 4] + "...'"


def is_valid(name: object) -> bool:
    return isinstance(name, str) and NAME_RE.fullmatch(name) is not None and name not in RESERVED


def check_name(name: str, kind: str, error: type[InvalidNameError] = InvalidNameError) -> str:
    """`name` if it follows the rule, else `error` naming the `kind` (sandbox, agent, key)."""
    if name in RESERVED:
        raise error(
            f"invalid {kind} name {shown(name)}: reserved (a directory all sandboxes share)"
        )
    if not is_valid(name):
        raise error(f"invalid {kind} name {shown(name)}")  # the rule is in the hint
    return name
