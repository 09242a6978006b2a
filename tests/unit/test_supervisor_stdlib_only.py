"""The in-sandbox supervisor runs on a bare Debian python3: it may import the stdlib only."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

SUPERVISOR = Path(__file__).resolve().parents[2] / "sandbox" / "supervisor"


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path.name}: relative import (not a package inside)"
            names.add((node.module or "").split(".")[0])
    return names


def test_supervisor_imports_only_the_stdlib_and_its_siblings() -> None:
    files = sorted(SUPERVISOR.glob("*.py"))
    siblings = {f.stem for f in files}
    assert "init" in siblings
    for f in files:
        foreign = _imports(f) - set(sys.stdlib_module_names) - siblings - {"__future__"}
        assert not foreign, f"{f.name} imports non-stdlib modules {sorted(foreign)}"


def test_no_supervisor_module_shadows_the_stdlib() -> None:
    # init.py puts its directory first on sys.path: a sibling named like a stdlib module
    # (signal.py, logging.py) would replace it for every import in PID 1.
    siblings = {f.stem for f in SUPERVISOR.glob("*.py")} - {"__init__"}
    assert not siblings & set(sys.stdlib_module_names)


def test_landlock_right_names_match_the_compiler_contract() -> None:
    text = (SUPERVISOR / "landlock.py").read_text()
    for name in (
        "execute",
        "write_file",
        "read_file",
        "read_dir",
        "remove_dir",
        "remove_file",
        "make_char",
        "make_dir",
        "make_reg",
        "make_sock",
        "make_fifo",
        "make_block",
        "make_sym",
        "refer",
        "truncate",
        "ioctl_dev",
        "bind_tcp",
        "connect_tcp",
    ):
        assert f'"{name}"' in text
