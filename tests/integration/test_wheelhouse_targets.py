"""The GPU images' wheelhouses, fetched for real from PyPI for another platform than this one:
DGX Spark (manylinux_2_39_aarch64) and RTX (manylinux_2_39_x86_64), CPython 3.12 (the vLLM
image's Python). Every wheel must install there: its tags are checked against that target's.

The wheels are kept where `appliance image build --target spark|rtx` keeps them (the image
cache), so a second run fetches nothing.
"""

from __future__ import annotations

import socket
import time

import pytest
from packaging.tags import Tag, compatible_tags, cpython_tags
from packaging.utils import parse_wheel_filename

from appliance.packaging import appliance_image as ai
from appliance.packaging.wheelhouse import build_wheelhouse, download_wheels, platform_tags

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _pypi_unreachable() -> str | None:
    try:
        socket.create_connection(("pypi.org", 443), timeout=5).close()
    except OSError as exc:
        return f"pypi.org unreachable ({exc}): the target wheelhouses are fetched from PyPI"
    return None


def target_tags(platform: str, python: str) -> set[Tag]:
    version = tuple(int(x) for x in python.split("."))
    platforms = platform_tags(platform)
    return set(cpython_tags(version, platforms=platforms)) | set(
        compatible_tags(version, f"cp{version[0]}{version[1]}", platforms=platforms)
    )


@pytest.mark.parametrize("name", ["spark", "rtx"])
def test_gpu_wheelhouse_is_built_for_its_target(name: str) -> None:
    from tests.sandbox_fixtures import IMAGE_CACHE

    if (why := _pypi_unreachable()) is not None:
        pytest.skip(why)
    t = ai.target(name)
    assert t.wheel_platform is not None
    dest = IMAGE_CACHE / "appliance" / name / "wheels"
    t0 = time.monotonic()
    wh = build_wheelhouse(dest, extras=t.extras, platform=t.wheel_platform, python_version=t.python)
    took = time.monotonic() - t0
    size = sum(w.stat().st_size for w in wh.wheels)
    print(f"\n{name}: {len(wh.wheels)} wheels, {size / 1e6:.1f} MB in {took:.1f} s ({dest})")

    ok = target_tags(t.wheel_platform, t.python)
    for wheel in wh.wheels:
        _name, _version, _build, tags = parse_wheel_filename(wheel.name)
        assert tags & ok, f"{wheel.name} does not install on {t.wheel_platform} / cp{t.python}"
    arch = t.wheel_platform.split("_", 3)[3]  # manylinux_2_39_<arch>
    binary = [w.name for w in wh.wheels if not w.name.endswith("-none-any.whl")]
    assert binary and all(arch in w for w in binary)  # pydantic-core, pyyaml, ...
    head = next(w for w in wh.wheels if w.name.startswith("gpu_appliance-"))
    assert head.name.endswith("-py3-none-any.whl")  # the appliance itself is pure Python
    assert wh.requirements.read_text().splitlines() == list(wh.pins)
    assert len(wh.wheels) == len(wh.pins)
    assert not any(p.startswith(("torch==", "transformers==")) for p in wh.pins)  # no embedded

    for pin in t.vllm_extras:  # Spark: fastsafetensors for vLLM's Python
        (extra,) = download_wheels(
            dest.parent / "vllm-extras", [pin], platform=t.wheel_platform, python_version=t.python
        )
        assert parse_wheel_filename(extra.name)[3] & ok, extra.name


def test_a_target_tag_is_required() -> None:
    """The check above can fail: this machine's own wheels do not fit an aarch64 target."""
    ok = target_tags("manylinux_2_39_aarch64", "3.12")
    assert not parse_wheel_filename("pyyaml-6.0.3-cp312-cp312-manylinux_2_17_x86_64.whl")[3] & ok
    assert not parse_wheel_filename("pyyaml-6.0.3-cp311-cp311-manylinux_2_17_aarch64.whl")[3] & ok
    assert parse_wheel_filename("pyyaml-6.0.3-cp312-cp312-manylinux_2_17_aarch64.whl")[3] & ok
