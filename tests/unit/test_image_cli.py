"""`appliance image`: the local commands that need no Podman (recipes, argument errors)."""

from __future__ import annotations

import json

import pytest

from appliance.cli.main import main
from appliance.packaging.images import ImageMismatch
from blueprints.catalog import Catalog
from sandbox.images.base import recipe_digest as base_recipe
from sandbox.images.openclaw import recipe_digest as openclaw_recipe


def test_recipes_lists_every_digest_the_shipped_blueprints_pin(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["image", "recipes", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    listed = {row["digest"] for row in rows}
    assert listed == {base_recipe(), openclaw_recipe()}
    assert all(row["image"] for row in rows)
    cat = Catalog()
    for e in cat.entries():
        assert cat.get(f"{e.name}@{e.version}").image.digest in listed, e.name

    assert main(["image", "recipes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(rows)  # one line per recipe, never wrapped
    assert {line.split()[0] for line in lines} == listed


def test_the_mismatch_hint_names_a_command_that_exists() -> None:
    """ImageMismatch tells the operator to look at `appliance image recipes`."""
    assert "`appliance image recipes`" in (ImageMismatch.hint or "")
    assert main(["image", "recipes", "--help"]) == 0


def test_an_unknown_layer_is_refused_before_anything_is_built(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A usage error (exit 2) before the base image's minutes of debootstrap, and without
    needing root or Podman to find it out."""
    assert main(["image", "build", "--layer", "nanobot"]) == 2
    assert "unknown layer 'nanobot'" in capsys.readouterr().err
