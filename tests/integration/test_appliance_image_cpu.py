"""The cpu appliance image on real Podman: built by the service user's Podman from the
debootstrap base (by id, `--network=none`), cached by its inputs, with its health check and a
root-owned venv of its own. A container from it serving a real completion is
tests/integration/test_quadlet_cpu_run.py (run with the Quadlet unit's settings).

The first build makes the wheelhouse (from pip's cache or PyPI) and takes ~3-4 min here; the
image is then found by its inputs digest (the appliance's own source is one input: a code change
rebuilds it, with the wheels cached). The build is the session's `cpu_image` fixture
(tests/conftest.py), shared with the Quadlet run.
"""

from __future__ import annotations

import contextlib
from typing import Any

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.xdist_group("cpu-image")]

READY_TIMEOUT_S = 300  # first start converts the GGUF (~25 s alone) on 2 busy cores
CHAT = (
    "import httpx, json, sys\n"
    "url = 'http://127.0.0.1:8080/v1/chat/completions'\n"
    "body = {'model': 'nemotron', 'max_tokens': 12, 'temperature': 0,\n"
    "        'messages': [{'role': 'user', 'content': 'Say hello.'}]}\n"
    "anon = httpx.post(url, json=body, timeout=60)\n"
    "r = httpx.post(url, json=body, headers={'Authorization': 'Bearer ' + sys.argv[1]},"
    " timeout=120)\n"
    "print(json.dumps({'anon': anon.status_code, 'status': r.status_code, 'body': r.json()}))\n"
)


def _run_output(ctr: Any, argv: list[str]) -> tuple[int, str, str]:
    code, (out, err) = ctr.exec_run(argv, demux=True)
    return code, (out or b"").decode(), (err or b"").decode()


@pytest.fixture(scope="module")
def built(cpu_image: dict[str, Any]) -> dict[str, Any]:
    """The image (built by the session's fixture, or found), and how long that took, twice."""
    ref = cpu_image["ref"]
    print(
        f"\ncpu image {ref.tag}: {ref.size / 1e6:.0f} MB; build {cpu_image['first_s']:.1f} s, "
        f"again {cpu_image['second_s']:.1f} s"
    )
    return cpu_image


def test_the_image_is_cached_by_its_inputs(built: dict[str, Any]) -> None:
    from appliance.packaging import appliance_image as ai

    ref, again = built["ref"], built["again"]
    assert ref.inputs_digest == built["digest"] and ref.tag == ai.tag_for(
        ai.target("cpu"), ref.inputs_digest
    )
    assert again.image_id == ref.image_id
    assert built["second_s"] < 30  # a label lookup, not a build
    labels = ref.labels
    assert labels[ai.INPUTS_LABEL] == ref.inputs_digest
    assert labels["org.appliance.recipe-digest"] == ref.inputs_digest  # not the base's
    assert labels["org.appliance.layer"] == "appliance-cpu"
    assert 200e6 < ref.size < 3e9


def test_the_image_keeps_its_health_check(built: dict[str, Any]) -> None:
    from tests.sandbox_fixtures import podman_client

    image = podman_client().images.get(built["ref"].image_id)
    check = image.attrs["Healthcheck"]["Test"]  # kept: built in Docker format
    assert check[0] == "CMD" and "/health/ready" in check[-1]


def test_the_venv_is_the_appliances_own_and_root_owned(built: dict[str, Any]) -> None:
    """A short container (no model start): the appliance's user, its venv without pip, the
    recipes as package data, code owned by root. Serving a completion from this image is
    tests/integration/test_quadlet_cpu_run.py's (with the Quadlet unit's settings)."""
    from tests.sandbox_fixtures import podman_client

    probe = (
        "import importlib.util as u, os, sys, appliance, pathlib;"
        "r = pathlib.Path(appliance.__file__).parent / 'packaging' / 'recipes';"
        "st = os.stat('/opt/appliance/venv/lib');"
        "print(os.getuid(), sys.prefix, u.find_spec('pip') is None, st.st_uid, oct(st.st_mode),"
        " sorted(p.name for p in r.glob('*')))"
    )
    client = podman_client()
    ctr = client.containers.create(
        built["ref"].image_id,
        entrypoint=["/opt/appliance/venv/bin/python", "-c", probe],
        command=[],
        network_mode="none",
        read_only=True,
        cap_drop=["ALL"],
        security_opt=["no-new-privileges"],
    )
    try:
        ctr.start()
        assert ctr.wait(timeout=60) == 0, b"".join(ctr.logs()).decode()
        out = b"".join(ctr.logs(stdout=True, stderr=False)).decode().strip()
    finally:
        with contextlib.suppress(Exception):
            ctr.remove(force=True)
    uid, prefix, no_pip, owner, mode, recipes = out.split(" ", 5)
    assert uid == "10001" and prefix == "/opt/appliance/venv"
    assert no_pip == "True"  # pip stayed in the build stage
    assert owner == "0" and not int(mode, 8) & 0o022  # the appliance's user cannot change code
    assert "cpu.Containerfile" in recipes  # the recipes are package data of the wheel
