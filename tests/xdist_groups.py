"""How `scripts/test.sh` shares the suite between two pytest-xdist workers (`--dist loadgroup`).

A unit of work is a test module, or every module whose module-level `pytestmark` names the same
`pytest.mark.xdist_group("...")`: module-scoped fixtures (a running sandbox, an appliance that is
`up`) are then made once, ordered steps stay in order, and modules that share a long build (the
bundle, the CPU image, the OpenClaw layer) run one after another on one worker while the other
worker takes the rest of the suite.

Why not xdist's own loadgroup: xdist 3.8.0 passes the group to the controller by appending
"@group" to the item's `_nodeid`, which pytest 9.2 no longer reads (node ids are structured), so
every test becomes its own unit, silently (pytest-dev/pytest-xdist#1386, fix not released). This
scheduler reads the group from the module's source instead, on the controller.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

from xdist.scheduler import LoadScopeScheduling

ROOT = Path(__file__).resolve().parent.parent


@cache
def module_group(path: str) -> str | None:
    """The `xdist_group` named in the module-level `pytestmark` of ROOT/path, if any."""
    try:
        tree = ast.parse((ROOT / path).read_text(encoding="utf-8"))
    except (OSError, SyntaxError, ValueError):
        return None
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "pytestmark" for t in node.targets
        ):
            for call in ast.walk(node.value):
                if (
                    isinstance(call, ast.Call)
                    and isinstance(call.func, ast.Attribute)
                    and call.func.attr == "xdist_group"
                    and call.args
                    and isinstance(call.args[0], ast.Constant)
                ):
                    return str(call.args[0].value)
    return None


def scope_of(nodeid: str) -> str:
    """The unit a test belongs to: its module's group, else its module."""
    module = nodeid.split("::", 1)[0]
    return module_group(module) or module


class ModuleGroupScheduling(LoadScopeScheduling):
    """LoadScopeScheduling with `scope_of` as the scope: whole modules, or whole groups."""

    def _split_scope(self, nodeid: str) -> str:
        return scope_of(nodeid)
