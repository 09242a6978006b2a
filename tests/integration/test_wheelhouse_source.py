"""The appliance's own wheel, built from its checkout: exactly the checkout's files, never the
leftovers of an earlier build (setuptools builds in the tree's build/, and a module since moved or
removed stays there; `pip wheel` on the checkout itself would ship it in every image and bundle).
"""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

from appliance.packaging.wheelhouse import (
    _copy_source,
    _source_files,
    _source_tree,
    own_wheel,
    source_digest,
)

pytestmark = [pytest.mark.integration]

PYPROJECT = """[build-system]
requires = ["setuptools>=69"]
build-backend = "setuptools.build_meta"

[project]
name = "gpu-appliance-synthetic"
version = "0.0.1"
readme = "README.md"

[tool.setuptools.packages.find]
include = ["appliance*"]
"""


def _checkout(root: Path) -> Path:
    """A checkout with what a developer's tree holds besides the sources."""
    files = {
        "pyproject.toml": PYPROJECT,
        "README.md": "synthetic\n",
        "appliance/__init__.py": "",
        "appliance/packaging/__init__.py": "",
        "appliance/packaging/recipes/cpu.Containerfile": "FROM scratch\n",
        # an earlier build, from before a module moved into appliance/packaging/
        "build/lib/appliance/appliance_image.py": "STALE = True\n",
        "gpu_appliance_synthetic.egg-info/SOURCES.txt": "appliance/appliance_image.py\n",
        "appliance/__pycache__/__init__.cpython-311.pyc": "",
        "tests/test_x.py": "",
    }
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_the_copy_holds_the_wheel_inputs_and_nothing_else(tmp_path: Path) -> None:
    source = _checkout(tmp_path / "src")
    copy = _copy_source(source, tmp_path / "copy")
    got = {str(p.relative_to(copy)) for p in copy.rglob("*") if p.is_file()}
    assert got == {
        "pyproject.toml",
        "README.md",
        "appliance/__init__.py",
        "appliance/packaging/__init__.py",
        "appliance/packaging/recipes/cpu.Containerfile",
    }


def test_the_copy_of_this_checkout_has_its_source_digest(tmp_path: Path) -> None:
    """The files copied are the files source_digest() names the image by."""
    source = _source_tree()
    assert source is not None  # the tests run from a checkout
    copy = _copy_source(source, tmp_path / "copy")
    h = hashlib.sha256()
    for path in _source_files(copy):
        h.update(str(path.relative_to(copy)).encode() + b"\0" + path.read_bytes() + b"\0")
    assert "sha256:" + h.hexdigest() == source_digest()


def test_a_stale_build_dir_does_not_reach_the_wheel(tmp_path: Path) -> None:
    source = _checkout(tmp_path / "src")
    dest = tmp_path / "wheels"
    own_wheel(source, dest)
    (wheel,) = dest.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "appliance/packaging/__init__.py" in names
    assert "appliance/appliance_image.py" not in names
    assert not (source / "build" / "lib" / "appliance" / "packaging").exists()  # not built there
