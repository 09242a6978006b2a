"""Blueprint `tools:`, `schedule:` and `lifecycle:` as a blueprint carries them: names checked
against the runtime's (errors at the offending entry's FILE:LINE), the self-scheduling tools
always denied, digests of blueprints that do not use the new sections unchanged, the shipped
openclaw 1.1.0, and `blueprint show` / `diff`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from blueprints.catalog import Catalog, load_blueprint
from blueprints.diff import diff, recreates
from blueprints.errors import BlueprintError
from blueprints.model import Blueprint, Tools
from blueprints.resolve import restore_pinned
from blueprints.runtimes.tools import (
    ALWAYS_DENIED,
    OPENCLAW_GROUPS,
    OPENCLAW_TOOLS,
    check_tool_name,
    render_tools,
)

INTEGRITY = "sha512-" + "A" * 86 + "=="
OPENCLAW = {"kind": "openclaw", "version": "2026.9.6", "integrity": INTEGRITY}
# What deployments pinned before `tools`, `schedule` and `lifecycle` existed.
PINNED = {
    "openclaw@1.0.0": "sha256:6fa7401d00ce95ad020077f772ed478c680858e27c6d9df185928da91f6e5400",
    "shell@1.0.0": "sha256:be9606f8b0224ff7a2660f328b26302015d8944a60f9664a3e4f664b7af78ed1",
}


def doc(**over) -> dict:
    base = {
        "name": "demo",
        "version": "1.0.0",
        "runtime": OPENCLAW,
        "image": {"name": "localhost/appliance-openclaw", "digest": "sha256:" + "ab" * 32},
        "sandbox": {"base": "default"},
    }
    return {**base, **over}


def errors_of(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "bp.yaml"
    path.write_text(text)
    with pytest.raises(BlueprintError) as info:
        load_blueprint(path)
    return str(info.value).splitlines()


def line_of(text: str, needle: str) -> int:
    return next(i for i, ln in enumerate(text.splitlines(), 1) if needle in ln)


# -- tool names --------------------------------------------------------------------------------


def test_openclaw_groups_hold_known_tools_and_group_openclaw_leaves_out_files_and_shell() -> None:
    for group, members in OPENCLAW_GROUPS.items():
        assert members <= OPENCLAW_TOOLS, group
    assert OPENCLAW_GROUPS["group:automation"] >= {"automations", "gateway", "plugins", "openclaw"}
    assert OPENCLAW_GROUPS["group:messaging"] == {"message"}
    everything = OPENCLAW_GROUPS["group:openclaw"]
    assert not everything & {"read", "write", "edit", "apply_patch", "exec", "process", "canvas"}
    assert "code_execution" in everything and "pdf" in everything


def test_unknown_tool_names_are_errors_at_their_entry(tmp_path: Path) -> None:
    text = yaml.safe_dump(doc(), sort_keys=False) + (
        "tools:\n"
        "  allowed: [read, exec]\n"
        "  denied:\n"
        "    - group:messaging\n"
        "    - messaging\n"  # the mission's spelling of the group
        "    - reed\n"
        "    - Read\n"
        "    - group:everything\n"
        f"    - {'x' * 5000}\n"
    )
    errors = errors_of(tmp_path, text)
    assert len(errors) == 5, errors
    by_entry = dict(e.split(": ", 2)[1:] for e in errors)
    assert "`group:messaging`" in by_entry["tools.denied.1"]
    assert "did you mean read" in by_entry["tools.denied.2"]
    assert "did you mean read" in by_entry["tools.denied.3"]  # names are exact, lowercase
    assert "unknown tool 'group:everything'" in by_entry["tools.denied.4"]
    assert len(by_entry["tools.denied.5"]) < 200  # a hostile name is not echoed whole
    for index, needle in ((1, "- messaging"), (2, "- reed"), (5, "- xxx")):
        where = f"bp.yaml:{line_of(text, needle)}: tools.denied.{index}:"
        assert any(where in e for e in errors), (where, errors)


@pytest.mark.parametrize("name", ["cron", "automations", "gateway", "plugins", "group:automation"])
def test_allowing_a_self_scheduling_tool_is_an_error(tmp_path: Path, name: str) -> None:
    text = yaml.safe_dump(doc(tools={"allowed": ["read", name]}), sort_keys=False)
    [error] = errors_of(tmp_path, text)
    assert f"bp.yaml:{line_of(text, f'- {name}')}: tools.allowed.1:" in error
    assert "the control plane schedules agents; agents never schedule themselves" in error


def test_a_command_runtime_has_no_tool_policy(tmp_path: Path) -> None:
    command = {"kind": "command", "command": ["sleep", "infinity"]}
    text = yaml.safe_dump(doc(runtime=command, tools={"denied": ["exec"]}), sort_keys=False)
    [error] = errors_of(tmp_path, text)
    assert f"bp.yaml:{line_of(text, 'tools:')}: tools: runtime kind 'command'" in error
    # An empty section is no policy at all.
    assert Blueprint.model_validate(doc(runtime=command, tools={})).tools == Tools()


def test_a_name_both_allowed_and_denied_is_an_error() -> None:
    with pytest.raises(ValueError, match="read: both allowed and denied"):
        Blueprint.model_validate(doc(tools={"allowed": ["read"], "denied": ["read", "exec"]}))
    with pytest.raises(ValueError, match="exec: both allowed and denied"):  # bash is exec
        Blueprint.model_validate(doc(tools={"allowed": ["bash"], "denied": ["exec"]}))


def test_render_denies_self_scheduling_resolves_aliases_and_keeps_order() -> None:
    tools = Tools(
        allowed=["read", "bash", "exec"], denied=["group:messaging", "cron", "apply-patch"]
    )
    rendered = render_tools(tools)
    assert rendered["allow"] == ["read", "exec"]
    assert rendered["deny"][:3] == ["group:messaging", "automations", "apply_patch"]
    assert set(ALWAYS_DENIED) <= set(rendered["deny"])
    assert len(rendered["deny"]) == len(set(rendered["deny"]))
    assert render_tools(None) == {"allow": [], "deny": list(ALWAYS_DENIED)}
    assert render_tools(Tools()) == render_tools(None)


def test_check_tool_name_for_one_runtime() -> None:
    assert check_tool_name("group:fs", allowed=True, kind="openclaw") == "group:fs"
    with pytest.raises(ValueError, match="unknown command tool 'read'"):
        check_tool_name("read", allowed=False, kind="command")


# -- digests -----------------------------------------------------------------------------------


def test_shipped_blueprints_keep_the_digests_deployments_pinned() -> None:
    cat = Catalog()
    for ref, digest in PINNED.items():
        assert cat.get(ref).digest() == digest, ref


def test_new_sections_at_their_defaults_leave_the_digest_alone() -> None:
    plain = Blueprint.model_validate(doc())
    spelled = Blueprint.model_validate(
        doc(tools={"allowed": [], "denied": []}, schedule=[], lifecycle={"fail_closed_after": 120})
    )
    assert spelled.digest() == plain.digest()
    assert not {"tools", "schedule", "lifecycle"} & set(json.loads(plain.canonical()))
    for change in (
        {"tools": {"denied": ["group:messaging"]}},
        {"schedule": [{"every": "30m", "prompt": "tidy up"}]},
        {"lifecycle": {"fail_closed_after": 0}},
    ):
        used = Blueprint.model_validate(doc(**change))
        assert used.digest() != plain.digest(), change
        assert restore_pinned(used.canonical(), used.digest()) == used  # the stored copy


# -- the shipped 1.1.0 -------------------------------------------------------------------------


def test_openclaw_1_1_0_is_1_0_0_with_a_tool_policy_and_a_lifecycle() -> None:
    cat = Catalog()
    old, new = cat.get("openclaw@1.0.0"), cat.get("openclaw@1.1.0")
    assert cat.get("openclaw") == new
    assert "group:messaging" in new.tools.denied and not new.tools.allowed
    assert new.lifecycle.fail_closed_after == 120 and new.schedule == []
    assert "deny" not in new.agent_config["tools"]  # one source: the `tools:` section
    old_deny = set(old.agent_config["tools"]["deny"])
    expanded = set()
    for name in new.tools.denied:
        expanded |= OPENCLAW_GROUPS.get(name, {name})
    assert old_deny <= expanded  # nothing 1.0.0 denied is allowed again
    paths = {c.path for c in diff(old, new)}
    assert paths == {"version", "tools.denied", "agent_config.tools.deny"}
    assert old.policy() == new.policy() and old.image == new.image


# -- show and diff -----------------------------------------------------------------------------


def test_show_and_diff_print_tools_schedule_and_lifecycle(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from appliance.cli.main import main

    a = tmp_path / "a.yaml"
    b = tmp_path / "b.yaml"
    a.write_text(yaml.safe_dump(doc(), sort_keys=False))
    entry = {"cron": "0 9 * * 1-5", "tz": "Europe/Paris", "prompt": "Summarise", "session": "daily"}
    b.write_text(
        yaml.safe_dump(
            doc(
                tools={"denied": ["group:web"]},
                schedule=[entry],
                lifecycle={"fail_closed_after": 30},
            ),
            sort_keys=False,
        )
    )
    assert main(["blueprint", "show", str(b), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["blueprint"]["schedule"] == [{**entry, "every": None, "active_hours": None}]
    assert shown["blueprint"]["lifecycle"] == {"fail_closed_after": 30}
    assert shown["tool_policy"]["deny"][0] == "group:web"
    assert "automations" in shown["tool_policy"]["deny"]
    assert main(["blueprint", "show", str(b)]) == 0
    text = capsys.readouterr().out
    assert "fail_closed_after: 30" in text and "0 9 * * 1-5" in text and "automations" in text
    assert main(["blueprint", "diff", str(a), str(b), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    changes = {c["path"]: c for c in out["changes"]}
    assert changes["tools.denied"]["new"] == ["group:web"]
    assert changes["schedule.0.cron"] == {
        "path": "schedule.0.cron",
        "old": None,
        "new": entry["cron"],
    }
    assert changes["lifecycle.fail_closed_after"]["old"] == 120
    assert out["recreates_sandbox"]  # the tool policy and lifecycle live in the sandbox


def test_a_schedule_change_alone_keeps_the_sandbox() -> None:
    a = Blueprint.model_validate(doc(schedule=[{"every": "30m", "prompt": "a"}]))
    b = Blueprint.model_validate(doc(schedule=[{"every": "1h", "prompt": "a"}]))
    changes = diff(a, b)
    assert [c.path for c in changes] == ["schedule.0.every"]
    assert not recreates(changes)
