"""One offline bundle per source tree, shared by the bundle round trip and the Ansible converge.

`appliance bundle create` takes about a minute (330 MB of wheels, the sandbox images, the host
packages' closure), so the bundle is cached under /var/tmp keyed by the content of everything
that goes into it; a changed source file makes a new one and drops the old.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

from tests.helpers import cli_env

REPO = Path(__file__).resolve().parents[1]
CACHE = Path("/var/tmp/appliance-bundle-cache")
APPLIANCE = str(Path(sys.executable).parent / "appliance")
_SOURCES = ("pyproject.toml", "appliance", "inference", "sandbox", "blueprints", "hardware")
_SOURCES += ("ansible",)


def source_key() -> str:
    h = hashlib.sha256()
    for top in _SOURCES:
        root = REPO / top
        paths = [root] if root.is_file() else sorted(root.rglob("*"))
        for p in paths:
            if p.is_file() and "__pycache__" not in p.parts and not p.name.endswith(".pyc"):
                h.update(str(p.relative_to(REPO)).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:16]


def bundle_skip_reason() -> str | None:
    """Why a full bundle (with images and host packages) cannot be made here, or None."""
    from tests.sandbox_fixtures import sandbox_skip_reason

    if (reason := sandbox_skip_reason()) is not None:
        return reason
    for tool in ("apt-get", "apt-cache", "dpkg-deb"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed: not a Debian host"
    return None


def ensure_bundle() -> Path:
    """The bundle of this source tree (created once, then reused from the cache). Under an
    exclusive lock next to the cache: a second worker waits for the first one's bundle."""
    from tests.sandbox_fixtures import cache_lock

    key = source_key()
    bundle = CACHE / key / "bundle"
    if (bundle / "SHA256SUMS").is_file():
        return bundle
    with cache_lock(CACHE.with_name(CACHE.name + ".lock")):
        return _create_bundle(key, bundle)


def _create_bundle(key: str, bundle: Path) -> Path:
    from tests.sandbox_fixtures import ensure_base_image

    if (bundle / "SHA256SUMS").is_file():  # made while this process waited for the lock
        return bundle
    ensure_base_image()
    for old in CACHE.glob("*"):
        if old.name != key:
            shutil.rmtree(old, ignore_errors=True)
    bundle.parent.mkdir(parents=True, exist_ok=True)
    env = cli_env(bundle.parent / "state", bundle.parent)
    proc = subprocess.run(
        [APPLIANCE, "bundle", "create", "--out", str(bundle)],
        capture_output=True,
        text=True,
        timeout=1200,
        env=env,
    )
    if proc.returncode != 0:
        raise AssertionError(f"bundle create failed:\n{proc.stdout}\n{proc.stderr}")
    return bundle
