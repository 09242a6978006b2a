"""Shared fixtures: every test gets its own state dir and config layers, never the real ones.

Parallel runs (scripts/test.sh: `-n 2 --dist loadgroup`): tests/xdist_groups.py makes a module,
or a named `xdist_group` of modules, one unit of work; the long builds' groups (XDIST_HEAVY) are
handed out first, so they run beside the rest of the suite instead of after it.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# The shared helpers and proxy harnesses assert (golden files, answers): let pytest explain their
# failures as it does a test's.
pytest.register_assert_rewrite(
    "tests.helpers", "tests.integration.egress_harness", "tests.integration.relay_harness"
)

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures"

# Groups handed to the workers first, longest first (fresh machine, 2 cores). The bundle group
# builds the OpenClaw layer for its bundle; the OpenClaw group comes last and finds it built.
XDIST_HEAVY = ("bundle", "cpu-image", "openclaw")


def pytest_configure(config: pytest.Config) -> None:
    # A suite started in the background of a non-interactive shell inherits SIGINT ignored, and so
    # would every CLI the tests start: Python then installs no KeyboardInterrupt handler and the
    # tests that stop `--watch`/`--follow` with Ctrl-C would wait forever. Children get the default.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    if config.getvalue("dist") != "loadgroup":
        return None
    from tests.xdist_groups import ModuleGroupScheduling

    return ModuleGroupScheduling(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """In xdist workers (they see dist "no"), the heavy groups first: the scheduler hands units
    out in this order (scripts/test.sh passes --no-loadscope-reorder). Every worker sorts alike;
    a run in one process keeps the collection order."""
    if not hasattr(config, "workerinput"):
        return
    from tests.xdist_groups import scope_of

    def rank(item: pytest.Item) -> int:
        scope = scope_of(item.nodeid)
        return XDIST_HEAVY.index(scope) if scope in XDIST_HEAVY else len(XDIST_HEAVY)

    items.sort(key=rank)  # stable: the rest keep their collection order


@pytest.fixture(autouse=True)
def isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point every config layer and the state dir into tmp_path."""
    for name in list(os.environ):
        if name.startswith("APPLIANCE_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("APPLIANCE_SYSTEM_CONFIG", str(tmp_path / "etc" / "appliance.yaml"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("APPLIANCE_STATE_DIR", str(tmp_path / "state"))
    # No control-plane TCP port unless a test asks: parallel tests would race for the default.
    monkeypatch.setenv("APPLIANCE_CONTROL__PORT", "null")
    return tmp_path


@pytest.fixture
def control_plane(isolated_env: Path) -> Iterator[subprocess.Popen]:
    """A real control plane on this test's state dir (its CLI calls that change state need one)."""
    from tests.control_fixtures import running_control_plane

    with running_control_plane(dict(os.environ), isolated_env / "state") as proc:
        yield proc


_shared_podman_checked = False


@pytest.fixture(autouse=True)
def shared_podman_first(request: pytest.FixtureRequest) -> None:
    """Under xdist, start the service user's Podman once, under a lock, before the first real
    test of each worker: a CLI or control plane that a test starts then finds it running
    instead of racing the other worker to create its socket (and a test that stops the service
    only if it started it leaves it alone)."""
    global _shared_podman_checked
    if _shared_podman_checked or "PYTEST_XDIST_WORKER" not in os.environ:
        return
    if not any(request.node.get_closest_marker(m) for m in ("integration", "e2e")):
        return
    _shared_podman_checked = True
    from tests.sandbox_fixtures import podman_client, sandbox_skip_reason

    if sandbox_skip_reason() is None:
        podman_client().close()


@pytest.fixture(scope="session")
def cpu_image() -> dict[str, Any]:
    """The CPU appliance image, built once per source tree (cached by its inputs) and shared
    by the image test and the Quadlet run (tests/sandbox_fixtures.py: ensure_cpu_image)."""
    from tests.sandbox_fixtures import cpu_image_skip_reason, ensure_cpu_image

    if (why := cpu_image_skip_reason()) is not None:
        pytest.skip(why)
    return ensure_cpu_image()
