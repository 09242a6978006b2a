"""The cpu appliance image on real Podman: built by the service user's Podman from the
debootstrap base (by id, `--network=none`), then a container from it, with no network at all,
starts backend + gateway and answers a real completion from the embedded model, with a key
created inside by `appliance keys create`.

The first build makes the wheelhouse (from pip's cache or PyPI) and takes ~3-4 min here; the
image is then found by its inputs digest (the appliance's own source is one input: a code change
rebuilds it, with the wheels cached).
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

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
def built() -> dict[str, Any]:
    """The image (built now, or found), and how long that took, twice."""
    from appliance import appliance_image as ai
    from sandbox.image import build_base_image
    from tests.sandbox_fixtures import IMAGE_CACHE, podman_client, sandbox_skip_reason

    if (why := sandbox_skip_reason()) is not None:
        pytest.skip(why)
    client = podman_client()
    base = build_base_image(client, workdir=IMAGE_CACHE)
    t = ai.target("cpu")
    digest = ai.inputs_digest(ai.inputs(t, base.image_id))
    if ai.find_appliance_image(client, t, digest) is None:
        try:
            socket.create_connection(("pypi.org", 443), timeout=5).close()
        except OSError as exc:
            pytest.skip(f"pypi.org unreachable ({exc}) and the cpu image is not built yet")
    t0 = time.monotonic()
    ref = ai.build_appliance_image(client, "cpu", workdir=IMAGE_CACHE, progress=print)
    first = time.monotonic() - t0
    t0 = time.monotonic()
    again = ai.build_appliance_image(client, "cpu", workdir=IMAGE_CACHE)
    second = time.monotonic() - t0
    print(
        f"\ncpu image {ref.tag}: {ref.size / 1e6:.0f} MB; build {first:.1f} s, again {second:.1f} s"
    )
    return {"ref": ref, "again": again, "first_s": first, "second_s": second, "digest": digest}


def test_the_image_is_cached_by_its_inputs(built: dict[str, Any]) -> None:
    from appliance import appliance_image as ai

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


@pytest.fixture(scope="module")
def container(built: dict[str, Any]) -> Iterator[Any]:
    """`appliance serve all` from the image: no network, read-only root, no capabilities."""
    from tests.sandbox_fixtures import podman_client

    client = podman_client()
    name = "appliance-cpu-itest"
    with contextlib.suppress(Exception):
        client.containers.get(name).remove(force=True, v=True)
    ctr = client.containers.create(
        built["ref"].image_id,
        name=name,
        network_mode="none",
        read_only=True,
        cap_drop=["ALL"],
        security_opt=["no-new-privileges"],
        detach=True,
    )
    try:
        ctr.start()
        yield ctr
    finally:
        with contextlib.suppress(Exception):
            ctr.remove(force=True, v=True)


def _logs(ctr: Any) -> str:
    code, out, _ = _run_output(ctr, ["sh", "-c", "tail -n 20 /var/lib/appliance/logs/*.log"])
    return out if code == 0 else ""


def test_container_answers_a_completion_from_the_embedded_model(
    built: dict[str, Any], container: Any
) -> None:
    from tests.sandbox_fixtures import podman_client

    image = podman_client().images.get(built["ref"].image_id)
    check = image.attrs["Healthcheck"]["Test"]  # kept: built in Docker format
    assert check[0] == "CMD" and "/health/ready" in check[-1]
    t0 = time.monotonic()
    while True:  # the image's own health check, run the way Podman runs it
        code, _, _ = _run_output(container, check[1:])
        if code == 0:
            break
        container.reload()
        assert container.status == "running", f"container exited:\n{_logs(container)}"
        assert time.monotonic() - t0 < READY_TIMEOUT_S, f"not ready:\n{_logs(container)}"
        time.sleep(2)
    ready_s = time.monotonic() - t0

    code, out, err = _run_output(container, ["appliance", "keys", "create", "itest", "--json"])
    assert code == 0, err
    secret = json.loads(out)["secret"]
    t0 = time.monotonic()
    code, out, err = _run_output(container, ["/opt/appliance/venv/bin/python", "-c", CHAT, secret])
    took = time.monotonic() - t0
    assert code == 0, err
    result = json.loads(out)
    assert result["anon"] == 401  # no key, no completion
    assert result["status"] == 200, result
    body = result["body"]
    assert body["choices"][0]["message"]["content"].strip()
    assert body["usage"]["completion_tokens"] > 0
    print(f"\nready after {ready_s:.1f} s; completion ({body['usage']}) in {took:.1f} s")

    code, out, _ = _run_output(container, ["appliance", "status", "--json"])
    assert code == 0


def test_container_runs_unprivileged_with_its_own_venv(container: Any) -> None:
    code, out, _ = _run_output(container, ["id", "-u"])
    assert (code, out.strip()) == (0, "10001")
    probe = (
        "import importlib.util as u, sys, appliance, pathlib;"
        "r = pathlib.Path(appliance.__file__).parent / 'recipes';"
        "print(sys.prefix, u.find_spec('pip') is None, sorted(p.name for p in r.glob('*')))"
    )
    code, out, err = _run_output(container, ["/opt/appliance/venv/bin/python", "-c", probe])
    assert code == 0, err
    prefix, no_pip, recipes = out.split(" ", 2)
    assert prefix == "/opt/appliance/venv" and no_pip == "True"  # pip stayed in the build
    assert "cpu.Containerfile" in recipes  # the recipes are package data of the wheel
    # Root owns the code: the appliance's user cannot change it (the root fs is read-only too).
    code, out, _ = _run_output(container, ["stat", "-c", "%u %a", "/opt/appliance/venv/lib"])
    assert code == 0 and out.split()[0] == "0" and not int(out.split()[1], 8) & 0o022
