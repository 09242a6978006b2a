"""Bring-up facts: the probes bring-up and the doctor share (one copy of each), and what the
facts say about a CDI spec, Podman and the models directory."""

from __future__ import annotations

import ast
from pathlib import Path

from appliance.bringup import facts
from appliance.ops.doctor import serving_host
from appliance.packaging import weights

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
