"""Bring-up facts: the probes bring-up and the doctor share (one copy of each), and what the
facts say about a CDI spec, Podman and the models directory."""

from __future__ import annotations

import ast
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from appliance.bringup import facts
from appliance.config import ApplianceConfig
from appliance.ops.doctor import serving_host
from appliance.packaging import weights
from tests.unit.bringup_cases import (
    READY,
    SPARK,
    no_vllm_on_path,  # noqa: F401  (autouse: applies here)
    steps_for,
)

REPO = Path(__file__).resolve().parents[2]


def _walks_up_to_an_existing_parent(fn: ast.FunctionDef) -> bool:
    """The body of "the nearest existing parent": a loop on `not X.exists()` that climbs."""
    return any(
        isinstance(node, ast.While)
        and "exists()" in ast.unparse(node.test)
        and ".parent" in ast.unparse(node)
        for node in ast.walk(fn)
    )


def test_the_nearest_existing_parent_has_one_copy() -> None:
    """Bring-up's free space, the weights' disk check and the doctor's disk checks ask the same
    question: one function answers it (packaging.weights, which both may import)."""
    copies = []
    for path in sorted((REPO / "appliance").rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and _walks_up_to_an_existing_parent(node):
                copies.append(f"{path.relative_to(REPO)}:{node.name}")
    assert copies == ["appliance/packaging/weights.py:nearest_existing"]
    assert serving_host.nearest_existing is weights.nearest_existing


def test_nearest_existing_and_free_bytes_of_a_directory_yet_to_be_made(tmp_path: Path) -> None:
    missing = tmp_path / "models" / "hf" / "hub"
    assert weights.nearest_existing(missing) == tmp_path
    assert facts.free_bytes(missing) > 0


def test_the_cdi_spec_probe_is_bringups_and_the_doctor_reads_it_from_there() -> None:
    """bringup must not import ops (the doctor reads bring-up's probes, not the reverse)."""
    for path in (REPO / "appliance" / "bringup").rglob("*.py"):
        tree = ast.parse(path.read_text())
        imported = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)] + [
            a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names
        ]
        assert not [m for m in imported if m.startswith("appliance.ops")], path
    assert serving_host.find_cdi_spec is facts.find_cdi_spec


# ---------------------------------------------------------------- the models dir, for Podman


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory everyone may enter (pytest's own tmp dirs are 0700)."""
    path = Path(tempfile.mkdtemp(prefix="bringup-models-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


def _config(models: Path) -> ApplianceConfig:
    config = ApplianceConfig(state_dir=models.parent / "state", models_dir=models)
    config.sandbox.service_user = "nobody"  # as root: the backend's Podman runs as nobody here
    return config


def test_a_models_dir_the_backend_cannot_read_is_a_fact(open_dir: Path) -> None:
    models = open_dir / "models"
    models.mkdir(mode=0o755)
    assert facts.models_unreadable(_config(models)) is None
    models.chmod(0o750)  # the image's user (a subuid: "other") cannot list it
    why = facts.models_unreadable(_config(models))
    assert why is not None and str(models) in why and "drwxr-x---" in why
    # Not made yet: judged by where the download will make it (0755 under an open dir).
    assert facts.models_unreadable(_config(open_dir / "later" / "models")) is None


def test_the_weights_step_is_blocked_when_podman_cannot_read_the_models() -> None:
    why = "nobody cannot read /var/lib/appliance-models (mode drwx------)"
    for present in (True, False):  # either way the container cannot mount them
        step = steps_for(SPARK, replace(READY, weights=present, models_unreadable=why))["weights"]
        assert step.state == "blocked" and why in step.why
        assert step.fix and "chmod 0755" in step.fix and "models_dir" in step.fix
        assert "\n" not in step.why + step.fix
