"""The Quadlet files' settings on real Podman: the cpu image run as root's Podman runs it from
/etc/containers/systemd, with exactly the `podman run` argv the unit amounts to (Podman 4.3
here has no Quadlet generator to do it): a Quadlet-style named volume, the gateway published on
loopback, read-only root, no capabilities, no-new-privileges and the explicit HealthCmd.

The image is the session's `cpu_image` fixture (tests/conftest.py: built once in the service
user's store, or found by its inputs), copied into root's store (~40 s, once per image id).
"""

from __future__ import annotations

import json
import os
import pwd
import resource
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from appliance.services import quadlet as q
from tests.helpers import SERVICE_USER, free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.xdist_group("cpu-image")]

TAG = "localhost/appliance-cpu:quadlet-itest"  # its copy in root's store
READY_TIMEOUT_S = 300


def _podman(*args: str, timeout: float = 120, check: bool = True) -> str:
    done = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"podman {' '.join(args[:3])}: {done.stderr.strip()}")
    return done.stdout


def _user_podman(*args: str) -> list[str]:
    pw = pwd.getpwnam(SERVICE_USER)
    env = [f"HOME={pw.pw_dir}", f"XDG_RUNTIME_DIR=/run/user/{pw.pw_uid}"]
    return ["runuser", "-u", SERVICE_USER, "--", "env", *env, "podman", *args]


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "Quadlet files in /etc run root's Podman: needs root"
    if shutil.which("podman") is None:
        return "podman is not installed"
    try:
        pwd.getpwnam(SERVICE_USER)
    except KeyError:
        return f"no service user {SERVICE_USER!r} (the cpu image is built in its store)"
    return None


@pytest.fixture(scope="module")
def image(cpu_image: dict[str, Any]) -> str:
    """The cpu image in root's store under TAG (copied from the service user's store)."""
    if (why := _skip_reason()) is not None:
        pytest.skip(why)
    ref = cpu_image["ref"]
    if subprocess.run(["podman", "image", "exists", ref.image_id], check=False).returncode != 0:
        # docker-archive keeps the image id (and HEALTHCHECK) across the two stores.
        save = subprocess.Popen(
            _user_podman("save", "--format", "docker-archive", ref.tag), stdout=subprocess.PIPE
        )
        load = subprocess.run(
            ["podman", "load"], stdin=save.stdout, capture_output=True, text=True, timeout=600
        )
        assert save.wait(timeout=60) == 0 and load.returncode == 0, load.stderr
    _podman("tag", ref.image_id, TAG)
    # Root's store keeps one copy: older ones this test loaded go (each is ~1.4 GB).
    for line in _podman("images", "--format", "{{.Id}} {{.Repository}}").splitlines():
        other, repo = line.split()
        if repo == TAG.rsplit(":", 1)[0] and not ref.image_id.startswith(other):
            _podman("rmi", "--force", other, check=False)
    return TAG


def _environment_only() -> list[str]:
    """This machine's rlimits are below rootful Podman's defaults (nofile 1048576), which runc
    then cannot set: not a setting of the unit, so not in its argv."""
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nproc = min(4096, resource.getrlimit(resource.RLIMIT_NPROC)[1])
    return [f"--ulimit=nofile={nofile}:{nofile}", f"--ulimit=nproc={nproc}:{nproc}"]


@pytest.fixture(scope="module")
def running(image: str) -> Iterator[dict[str, Any]]:
    name, volume = f"appliance-quadlet-itest-{os.getpid()}", f"appliance-itest-{os.getpid()}"
    spec = q.spec_for(image, host_port=free_port())
    argv = spec.podman_run_argv(name=name, volume=volume)
    # What the .volume's generated service runs, then the container detached (as Quadlet does).
    _podman("volume", "create", "--label", "org.appliance.volume=state", f"systemd-{volume}")
    try:
        assert argv[:2] == ["podman", "run"]
        _podman("run", "--detach", *_environment_only(), *argv[2:])
        yield {"spec": spec, "name": name, "argv": argv}
    finally:
        _podman("rm", "--force", "--time", "0", name, check=False)
        _podman("volume", "rm", "--force", f"systemd-{volume}", check=False)


def _exec(name: str, *cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["podman", "exec", name, *cmd], capture_output=True, text=True, timeout=120
    )


def _http(url: str, body: dict | None = None, key: str | None = None) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, {}


@pytest.fixture(scope="module")
def healthy(running: dict[str, Any]) -> dict[str, Any]:
    """Ready by the unit's own HealthCmd, run the way Podman's timer runs it."""
    name, t0 = running["name"], time.monotonic()
    while True:
        check = subprocess.run(
            ["podman", "healthcheck", "run", name], capture_output=True, text=True, timeout=60
        )
        if check.returncode == 0:
            break
        state = _podman("inspect", "--format", "{{.State.Running}}", name).strip()
        logs = _podman("logs", "--tail", "30", name, check=False)
        assert state == "true", f"container exited:\n{logs}"
        assert time.monotonic() - t0 < READY_TIMEOUT_S, f"not healthy:\n{logs}"
        time.sleep(3)
    print(f"\nhealthy after {time.monotonic() - t0:.1f} s")
    return running


def test_podman_applies_every_setting_of_the_unit(healthy: dict[str, Any]) -> None:
    spec, name = healthy["spec"], healthy["name"]
    info = json.loads(_podman("inspect", name))[0]
    host = info["HostConfig"]
    assert info["Config"]["Healthcheck"]["Test"] == ["CMD-SHELL", q.HEALTH_CMD]
    assert host["ReadonlyRootfs"] is True
    assert "no-new-privileges" in host["SecurityOpt"]
    assert host["PortBindings"] == {
        f"{q.CONTAINER_PORT}/tcp": [{"HostIp": "127.0.0.1", "HostPort": str(spec.host_port)}]
    }
    mounts = {m["Destination"]: m for m in info["Mounts"]}
    assert mounts[q.STATE_MOUNT]["Type"] == "volume" and mounts[q.STATE_MOUNT]["RW"]


def test_the_process_is_unprivileged_and_the_root_read_only(healthy: dict[str, Any]) -> None:
    name = healthy["name"]
    assert _exec(name, "id", "-u").stdout.strip() == "10001"
    status = dict(
        line.split(":\t", 1) for line in _exec(name, "cat", "/proc/1/status").stdout.splitlines()
    )
    assert int(status["CapEff"], 16) == 0 and int(status["CapBnd"], 16) == 0
    assert status["NoNewPrivs"].strip() == "1"
    assert _exec(name, "touch", "/opt/x").returncode != 0  # read-only root
    mounts = {
        f[1]: f[2] for f in map(str.split, _exec(name, "cat", "/proc/mounts").stdout.splitlines())
    }
    assert [mounts.get(p) for p in ("/tmp", "/var/tmp", "/run")] == ["tmpfs"] * 3  # VolatileTmp
    for writable in ("/tmp", "/var/tmp", q.STATE_MOUNT):
        probe = _exec(name, "sh", "-c", f"touch {writable}/.w && rm {writable}/.w")
        assert probe.returncode == 0, (writable, probe.stderr)
    owner = _exec(name, "stat", "-c", "%u %a", q.STATE_MOUNT).stdout.split()
    assert owner == ["10001", "750"]  # copied up from the image into the named volume


def test_the_gateway_answers_on_the_loopback_port(healthy: dict[str, Any]) -> None:
    spec, name = healthy["spec"], healthy["name"]
    base = f"http://127.0.0.1:{spec.host_port}"
    assert _http(f"{base}/health/ready")[0] == 200
    body = {
        "model": "nemotron",
        "max_tokens": 8,
        "temperature": 0,
        "messages": [{"role": "user", "content": "Say hello."}],
    }
    assert _http(f"{base}/v1/chat/completions", body)[0] == 401  # no key, no completion
    made = _exec(name, "appliance", "keys", "create", "quadlet-itest", "--json")
    assert made.returncode == 0, made.stderr
    status, answer = _http(f"{base}/v1/chat/completions", body, json.loads(made.stdout)["secret"])
    assert status == 200 and answer["usage"]["completion_tokens"] > 0


def test_stop_is_clean_within_the_stop_timeout(healthy: dict[str, Any]) -> None:
    """systemd stops the unit with `podman stop`: SIGTERM reaches `serve all`, which exits 0."""
    name, t0 = healthy["name"], time.monotonic()
    _podman("stop", "--time", "30", name, timeout=60)
    assert time.monotonic() - t0 < 30
    assert _podman("inspect", "--format", "{{.State.ExitCode}}", name).strip() == "0"
