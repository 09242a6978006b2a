"""Where a blueprint comes from: a file the CLI reads (as the calling user) and sends as YAML
text, parsed by the control plane with the same digest and the same FILE:LINE errors; the base
policies reached through the sandbox package (never by path, never outside it); and the CLI's
blueprint commands importing nothing of the control plane but its client."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from blueprints.catalog import load_blueprint, parse_blueprint
from blueprints.errors import BlueprintError
from blueprints.model import Blueprint
from sandbox.policy import Policy, base_policy, base_policy_names

REPO = Path(__file__).resolve().parents[2]
DOC = {
    "name": "demo",
    "version": "1.0.0",
    "runtime": {"kind": "command", "command": ["sleep", "infinity"]},
    "image": {"name": "localhost/appliance-base", "digest": "sha256:" + "ab" * 32},
    "sandbox": {"base": "default", "additions": {"filesystem": {"read_only": ["/opt"]}}},
    "budgets": {"daily_tokens": 1000},
}


def test_text_and_file_give_the_same_blueprint_and_digest(tmp_path: Path) -> None:
    path = tmp_path / "bp.yaml"
    path.write_text(yaml.safe_dump(DOC, sort_keys=False))
    from_file = load_blueprint(path)
    from_text = parse_blueprint(path.read_text(), str(path))
    assert from_text == from_file and from_text.digest() == from_file.digest()
    for builtin in sorted((REPO / "blueprints").glob("*/*/blueprint.yaml")):
        assert (
            parse_blueprint(builtin.read_text(), "x").digest() == load_blueprint(builtin).digest()
        )


def test_text_errors_name_the_source_and_line() -> None:
    with pytest.raises(BlueprintError) as syntax:
        parse_blueprint("name: demo\nversion: [1.0.0\n", "mine.yaml")
    assert str(syntax.value).startswith("mine.yaml:3:")
    bad = yaml.safe_dump({**DOC, "surprise": 1}, sort_keys=False)
    with pytest.raises(BlueprintError, match=r"mine.yaml:\d+: surprise: unknown field"):
        parse_blueprint(bad, "mine.yaml")
    with pytest.raises(BlueprintError, match="expected a mapping"):
        parse_blueprint("- a list\n", "mine.yaml")


def test_base_policies_come_from_the_sandbox_package_by_name() -> None:
    names = base_policy_names()
    assert {"default", "openclaw"} <= set(names)
    assert isinstance(base_policy("default"), Policy)
    for hostile in ("../policies/default", "/etc/shadow", "default/../default", "", "nope"):
        with pytest.raises(KeyError):
            base_policy(hostile)


@pytest.mark.parametrize("base", ["../policies/default", "../../../../etc/passwd", "/etc/x"])
def test_a_blueprint_base_outside_the_named_policies_is_refused(base: str) -> None:
    """`sandbox.base` names a policy; it never becomes a path the control plane opens."""
    with pytest.raises(ValueError, match="unknown base policy"):
        Blueprint.model_validate({**DOC, "sandbox": {"base": base}})


def test_blueprints_model_does_not_reach_into_sandbox_by_path() -> None:
    source = (REPO / "blueprints" / "model.py").read_text()
    assert (
        '"policies"' not in source and '"sandbox"' not in source and "parent.parent" not in source
    )


def test_the_blueprint_cli_imports_no_control_plane_module_but_the_client() -> None:
    for module in ("blueprint.py", "agent.py"):
        tree = ast.parse((REPO / "appliance" / "cli" / module).read_text())
        imported = {
            node.module
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module is not None
        }
        control = {m for m in imported if m.startswith("appliance.control")}
        assert control <= {"appliance.control.client"}, (module, control)


def test_the_local_blueprint_commands_read_files_and_the_catalog(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """validate / show / diff need no control plane: they read as the operator (errors as
    FILE:LINE, exit 3), and an agent create with a bad file fails the same way before any
    connection is tried (exit 3, not 7)."""
    import json

    from appliance.cli.main import main

    good = tmp_path / "bp.yaml"
    good.write_text(yaml.safe_dump(DOC, sort_keys=False))
    assert main(["blueprint", "validate", str(good), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["digest"] == load_blueprint(good).digest()
    assert main(["blueprint", "show", "openclaw", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["blueprint"]["name"] == "openclaw"
    assert main(["blueprint", "diff", str(good), str(good), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["changes"] == []
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: demo\nversion: [1.0.0\n")
    for argv in (["blueprint", "validate", str(bad)], ["agent", "create", "a1", "-b", str(bad)]):
        assert main(argv) == 3
        err = capsys.readouterr().err
        assert err.startswith(f"appliance: error: {bad}:3:"), err
    assert main(["blueprint", "show", "no-such-blueprint"]) == 5
