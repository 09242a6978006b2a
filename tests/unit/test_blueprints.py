"""Blueprints: the model, policy resolution, the catalog, diffs and the JSON Schema.

UPDATE_GOLDEN=1 pytest tests/unit/test_blueprints.py   # rewrite the schema golden file
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from blueprints.catalog import Catalog, load_blueprint
from blueprints.diff import diff, recreates
from blueprints.errors import BlueprintError, BlueprintNotFound
from blueprints.model import Blueprint, semver_key
from tests.helpers import assert_golden

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "blueprint.schema.json"
DIGEST = "sha256:" + "ab" * 32
INTEGRITY = "sha512-" + "A" * 86 + "=="


def doc(**over) -> dict:
    base = {
        "name": "demo",
        "version": "1.0.0",
        "runtime": {"kind": "command", "command": ["sleep", "infinity"]},
        "image": {"name": "localhost/appliance-base", "digest": DIGEST},
        "sandbox": {"base": "default"},
    }
    base.update(over)
    return base


def write(root: Path, data: dict, name: str | None = None, version: str | None = None) -> Path:
    path = root / (name or data["name"]) / (version or data["version"]) / "blueprint.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def error_of(tmp_path: Path, text: str) -> str:
    path = tmp_path / "bp.yaml"
    path.write_text(text)
    with pytest.raises(BlueprintError) as info:
        load_blueprint(path)
    return str(info.value)


# -- validation with file:line ------------------------------------------------------------------


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    msg = error_of(tmp_path, "name: demo\nversion: [1.0.0\n")
    assert msg.startswith(f"{tmp_path / 'bp.yaml'}:3:")


def test_unknown_field_is_rejected_at_its_line(tmp_path: Path) -> None:
    text = yaml.safe_dump(doc(), sort_keys=False) + "surprise: 1\n"
    msg = error_of(tmp_path, text)
    line = text.splitlines().index("surprise: 1") + 1
    assert f"bp.yaml:{line}: surprise: unknown field" in msg


@pytest.mark.parametrize(
    ("change", "key", "needle"),
    [
        (
            {"sandbox": {"base": "default", "additions": {"filesystem": {"read_write": ["/"]}}}},
            "read_write",
            "'/' is never writable",
        ),
        (
            {"sandbox": {"policy": {"process": {"uid": 0}}}},
            "uid",
            "greater than or equal to 1",
        ),
        ({"network_presets": ["inference-only", "everything"]}, "network_presets", "everything"),
        ({"image": {"name": "x", "digest": "latest"}}, "digest", "not a pinned digest"),
        ({"version": "1.0"}, "version", "not a semantic version"),
        (
            {"runtime": {"kind": "openclaw", "version": "2026.9.6"}},
            "runtime",
            "integrity",
        ),
        ({"sandbox": {"base": "nope"}}, "sandbox", "unknown base policy 'nope'"),
        (
            {"sandbox": {"base": "default", "policy": {}}},
            "sandbox",
            "exactly one of",
        ),
    ],
)
def test_semantic_errors_are_rejected_with_their_line(
    tmp_path: Path, change: dict, key: str, needle: str
) -> None:
    text = yaml.safe_dump(doc(**change), sort_keys=False)
    msg = error_of(tmp_path, text)
    assert needle in msg
    line = next(i for i, ln in enumerate(text.splitlines(), 1) if ln.strip().startswith(key))
    assert f"bp.yaml:{line}" in msg, msg


# -- policy resolution --------------------------------------------------------------------------


def test_policy_merges_base_additions_presets_and_overrides() -> None:
    bp = Blueprint.model_validate(
        doc(
            sandbox={
                "base": "default",
                "additions": {
                    "filesystem": {"read_only": ["/data"], "read_write": ["/workspace"]},
                    "network": {"allow": [{"host": "example.com"}], "deny": [{"host": "x.org"}]},
                    "syscalls": {"deny": ["sync"]},
                },
            },
            network_presets=["inference-only", "npm"],
            resources={"memory": "1g", "pids": 128, "cpus": 0.5},
            approval={"mode": "deny"},
        )
    )
    policy = bp.policy()
    assert policy.filesystem.read_write == ["/home/agent", "/tmp", "/workspace"]
    assert policy.filesystem.read_only == ["/data"]
    hosts = [e.host for e in policy.network.allow]
    assert hosts == ["inference.local", "registry.npmjs.org", "example.com"]
    assert [e.host for e in policy.network.deny] == ["x.org"]
    assert policy.syscalls.deny == ["sync"]
    assert policy.resources.memory == 1024**3 and policy.resources.pids == 128
    assert policy.network.approval.mode == "deny"


def test_inference_only_is_the_default_preset() -> None:
    bp = Blueprint.model_validate(doc())
    assert [e.host for e in bp.policy().network.allow] == ["inference.local"]


def test_digest_is_stable_and_content_addressed() -> None:
    a = Blueprint.model_validate(doc())
    assert a.digest() == Blueprint.model_validate(doc()).digest()
    assert a.digest() != Blueprint.model_validate(doc(description="x")).digest()


def test_semver_ordering() -> None:
    ordered = ["0.9.0", "1.0.0-rc1", "1.0.0", "1.2.0", "1.10.0"]
    assert sorted(ordered, key=semver_key) == ordered


# -- the catalog --------------------------------------------------------------------------------


def test_catalog_picks_the_newest_or_the_named_version(tmp_path: Path) -> None:
    for v in ("1.0.0", "1.2.0", "1.10.0"):
        write(tmp_path, doc(version=v))
    cat = Catalog(builtin=tmp_path)
    assert cat.versions("demo") == ["1.10.0", "1.2.0", "1.0.0"]
    assert cat.get("demo").version == "1.10.0"
    assert cat.get("demo@1.2.0").version == "1.2.0"
    with pytest.raises(BlueprintNotFound, match=re.escape("have: 1.10.0, 1.2.0, 1.0.0")):
        cat.get("demo@2.0.0")
    with pytest.raises(BlueprintNotFound, match="no blueprint named 'other'"):
        cat.get("other")


def test_catalog_refuses_a_file_that_lies_about_its_place(tmp_path: Path) -> None:
    write(tmp_path, doc(version="1.0.0"), version="1.1.0")
    with pytest.raises(BlueprintError, match=re.escape("says demo@1.0.0 but lives in demo/1.1.0/")):
        Catalog(builtin=tmp_path).get("demo@1.1.0")


def test_a_user_dir_cannot_replace_a_shipped_version(tmp_path: Path) -> None:
    write(tmp_path / "shipped", doc())
    write(tmp_path / "user", doc())  # identical: fine
    assert Catalog([tmp_path / "user"], builtin=tmp_path / "shipped").get("demo").name == "demo"
    write(tmp_path / "user", doc(description="changed"))
    with pytest.raises(BlueprintError, match="give the changed blueprint a new version"):
        Catalog([tmp_path / "user"], builtin=tmp_path / "shipped").entries()


def test_every_shipped_blueprint_loads() -> None:
    cat = Catalog()
    entries = cat.entries()
    assert {e.name for e in entries} >= {"openclaw"}
    for e in entries:
        bp = cat.get(f"{e.name}@{e.version}")
        assert bp.policy().process.uid != 0


# -- diff ---------------------------------------------------------------------------------------


def test_diff_shows_written_and_resolved_changes() -> None:
    a = Blueprint.model_validate(doc())
    b = Blueprint.model_validate(doc(version="1.1.0", network_presets=["inference-only", "pypi"]))
    changes = {c.path: c for c in diff(a, b)}
    assert changes["version"].old == "1.0.0" and changes["version"].new == "1.1.0"
    assert "policy.network.allow" in changes  # the preset widened the network
    assert not recreates(list(changes.values()))  # network only: hot-reloadable
    c = Blueprint.model_validate(doc(resources={"memory": "1g"}))
    assert recreates(diff(a, c))


# -- the JSON Schema ----------------------------------------------------------------------------


def test_json_schema_matches_the_golden_file() -> None:
    schema = Blueprint.model_json_schema()
    text = json.dumps(schema, indent=2, sort_keys=True) + "\n"
    assert_golden(GOLDEN, text)
    assert schema["additionalProperties"] is False


def test_shipped_blueprints_pin_recipes_this_appliance_builds() -> None:
    from sandbox.images.base import recipe_digest as base_recipe
    from sandbox.images.openclaw import recipe_digest as openclaw_recipe

    pins = {
        "localhost/appliance-base": base_recipe(),
        "localhost/appliance-openclaw": openclaw_recipe(),
    }
    cat = Catalog()
    for e in cat.entries():
        image = cat.get(f"{e.name}@{e.version}").image
        assert image.digest == pins[image.name], f"{e.name}@{e.version}: stale image pin"
