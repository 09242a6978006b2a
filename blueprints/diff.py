"""What changes between two blueprints: as written, and in the sandbox policy they resolve to.

The resolved policy is what an operator must review before an upgrade (a preset or a new base
can widen the network without a visible `network` change), so it is diffed too, with its static
part flagged: a static change means the upgrade re-creates the sandbox. Schedule entries are
compared one by one (`schedule.0.cron`); the tool policy and the lifecycle are written into the
sandbox, so changing them re-creates it too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from blueprints.model import Blueprint


@dataclass(frozen=True)
class Change:
    path: str  # dotted: "budgets.daily_tokens", "policy.network.allow"
    old: Any
    new: Any

    def as_dict(self) -> dict[str, Any]:
        return {"path": self.path, "old": self.old, "new": self.new}


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> None:
    # Lists stay whole: a rule list reads better as before/after than index by index.
    if isinstance(value, dict) and value:
        for key, item in value.items():
            _flatten(item, f"{prefix}.{key}" if prefix else str(key), out)
    else:
        out[prefix] = value


def _changes(old: dict[str, Any], new: dict[str, Any], prefix: str) -> list[Change]:
    a: dict[str, Any] = {}
    b: dict[str, Any] = {}
    _flatten(old, prefix, a)
    _flatten(new, prefix, b)
    return [
        Change(path, a.get(path), b.get(path))
        for path in sorted(a.keys() | b.keys())
        if a.get(path) != b.get(path)
    ]


def _written(bp: Blueprint) -> dict[str, Any]:
    data = bp.model_dump(mode="json")
    entries = data.pop("schedule")
    if entries:  # by index, so one changed prompt is one row
        data["schedule"] = {str(i): entry for i, entry in enumerate(entries)}
    return data


def diff(old: Blueprint, new: Blueprint) -> list[Change]:
    """Changes in the blueprint as written, then in its resolved `policy.*`."""
    written = _changes(_written(old), _written(new), "")
    resolved = _changes(
        old.policy().model_dump(mode="json"), new.policy().model_dump(mode="json"), "policy"
    )
    return written + resolved


def recreates(changes: list[Change]) -> bool:
    """Whether applying the change needs a new sandbox (a static policy part, the image, the
    runtime, its tool policy or its lifecycle; not the network rules or the schedule)."""
    return any(
        c.path.startswith("policy.") and not c.path.startswith("policy.network") for c in changes
    ) or any(c.path.startswith(("image.", "runtime.", "tools.", "lifecycle.")) for c in changes)
