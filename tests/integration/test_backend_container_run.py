"""The backend in the appliance image on real rootless Podman, as the supervisor runs it as root:
the service user's Podman, the cpu image (the session's `cpu_image` fixture, in that user's
store), the embedded model server inside it on the host's loopback port.

One real start for the module: a leftover container of a supervisor killed -9 (its foreground
`podman run` outlives it, holding the port) is there first and is replaced by that start; the
tests then check it is ready only after its warm-up, answers a completion, and that stop()
leaves no container. Then the vLLM stand-in (tests/fakes/fake_vllm.py, run by the image's
python) goes through VllmBackend in the image, through an OOM step-down.
"""

from __future__ import annotations

import base64
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from appliance.config import ApplianceConfig
from appliance.services import supervisor as sv
from hardware.planner import plan_serving
from hardware.snapshot import HostSnapshot
from inference.backends import ProcessBackend, VllmBackend
from inference.backends.container import ContainerSpec, models_dir_readable
from tests.helpers import SERVICE_USER, free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.xdist_group("cpu-image")]

REPO = Path(__file__).resolve().parents[2]
HOSTS_DIR = REPO / "tests" / "fixtures" / "hosts"
READY_TIMEOUT_S = 300
IMAGE_PYTHON = "/opt/appliance/venv/bin/python"


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "the supervisor runs the service user's Podman as root: needs root"
    if shutil.which("podman") is None:
        return "podman is not installed"
    try:
        pwd.getpwnam(SERVICE_USER)
    except KeyError:
        return f"no service user {SERVICE_USER!r}"
    return None


def user_podman(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """podman as the service user, with its rootless environment only (not the tests' own
    XDG_CONFIG_HOME, which that user cannot read)."""
    pw = pwd.getpwnam(SERVICE_USER)
    env = [f"HOME={pw.pw_dir}", f"XDG_RUNTIME_DIR=/run/user/{pw.pw_uid}", f"PATH={os.defpath}"]
    return subprocess.run(
        ["runuser", "-u", SERVICE_USER, "--", "env", "-i", *env, "podman", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def containers_named(name: str) -> list[str]:
    done = user_podman("ps", "-a", "--filter", f"name=^{name}$", "--format", "{{.Names}}")
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def wait_until(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out: {what}"
        time.sleep(0.2)


def port_answers(port: int) -> bool:
    try:
        httpx.get(f"http://127.0.0.1:{port}/", timeout=1)
    except httpx.HTTPError:
        return False
    return True


@pytest.fixture(scope="module")
def image(cpu_image: dict[str, Any]) -> str:
    if (why := _skip_reason()) is not None:
        pytest.skip(why)
    return str(cpu_image["ref"].tag)


@pytest.fixture(scope="module")
def served(image: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    state = tmp_path_factory.mktemp("ctr")
    port = free_port()
    config = ApplianceConfig.model_validate(
        {
            "state_dir": state,
            "inference": {
                "backend": "container",
                "backend_listen": {"port": port},
                "container": {"image": image},
            },
            "sandbox": {"service_user": SERVICE_USER},
        }
    )
    host = HostSnapshot.model_validate_json((HOSTS_DIR / "cpu_only.json").read_text())
    plan = plan_serving(
        host,
        None,
        served_model_name=config.inference.served_model_name,
        port=port,
        embedded_context=config.inference.embedded_context,
    )
    backend = sv.backend_process(config, plan)
    assert backend.container is not None
    name = backend.container.name

    # What a supervisor killed -9 leaves: its foreground `podman run` (a session of its own)
    # and the container, holding the port.
    leftover_argv = backend.container.run_argv(
        [IMAGE_PYTHON, "-m", "http.server", "--bind", "127.0.0.1", str(port)]
    )
    leftover = subprocess.Popen(
        leftover_argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=backend.spawn_env(),
        cwd=backend.container.account.home,
        start_new_session=True,
        **backend.container.account.popen_kwargs(os.geteuid()),  # type: ignore[arg-type]
    )
    progress: list[tuple[float, str]] = []
    try:
        wait_until(lambda: port_answers(port), 60, "the leftover container serves the port")
        assert containers_named(name) == [name]
        t0 = time.monotonic()
        backend.launch(READY_TIMEOUT_S, progress=lambda e, line: progress.append((e, line)))
        ready_s = time.monotonic() - t0
        print(f"\ncontainer backend ready (warmed up) after {ready_s:.1f} s")
        yield {
            "backend": backend,
            "name": name,
            "port": port,
            "progress": progress,
            "leftover": leftover,
            "config": config,
        }
    finally:
        backend.stop(grace=10)
        if leftover.poll() is None:
            leftover.kill()
        user_podman("rm", "--force", "--ignore", name)
        user_podman("volume", "rm", "--force", sv.cache_volume_name(config.state_dir))


def test_the_leftover_container_was_replaced(served: dict[str, Any]) -> None:
    assert served["leftover"].wait(timeout=30) is not None  # its container went: it exited
    assert containers_named(served["name"]) == [served["name"]]  # one: ours, running


def test_it_runs_on_the_service_users_podman(served: dict[str, Any]) -> None:
    backend: ProcessBackend = served["backend"]
    status = Path(f"/proc/{backend.pid}/status").read_text()
    uid = next(line.split()[1] for line in status.splitlines() if line.startswith("Uid:"))
    assert int(uid) == pwd.getpwnam(SERVICE_USER).pw_uid
    groups = next(line for line in status.splitlines() if line.startswith("Groups:"))
    assert groups.split()[1:] == []  # no supplementary group of root's kept
    assert backend.command_line().split(" podman ", 1)[1].startswith("--runtime runc run --rm")


def test_ready_only_after_the_warm_up(served: dict[str, Any]) -> None:
    lines = [line for _, line in served["progress"]]
    assert any(line.startswith("warming up") for line in lines), lines[-5:]
    metrics = served["backend"].metrics()
    assert metrics.requests_finished is not None and metrics.requests_finished >= 1


def test_a_completion_on_the_hosts_loopback_port(served: dict[str, Any]) -> None:
    body = {"model": "nemotron", "prompt": "The capital of France is", "max_tokens": 4}
    answer = httpx.post(f"http://127.0.0.1:{served['port']}/v1/completions", json=body, timeout=120)
    assert answer.status_code == 200, answer.text
    assert answer.json()["usage"]["completion_tokens"] > 0


def test_stop_leaves_no_container(served: dict[str, Any]) -> None:
    backend: ProcessBackend = served["backend"]
    pid = backend.pid
    t0 = time.monotonic()
    backend.stop(grace=10)
    print(f"\nstopped in {time.monotonic() - t0:.1f} s")
    assert backend.returncode is not None and not backend.running
    assert containers_named(served["name"]) == []
    assert not port_answers(served["port"])
    assert pid is not None and not Path(f"/proc/{pid}").exists()


@pytest.fixture
def open_tmp() -> Iterator[Path]:
    """A 0755 directory under /tmp: pytest's own tmp dirs are 0700, which the service user
    cannot enter (as it cannot enter a root 0700 state dir)."""
    made = Path(tempfile.mkdtemp(prefix="ctr-models-", dir="/tmp"))
    made.chmod(0o755)
    yield made
    shutil.rmtree(made, ignore_errors=True)


def test_vllm_stand_in_in_the_image_steps_down_after_an_oom(
    image: str, open_tmp: Path, served: dict[str, Any]
) -> None:
    """VllmBackend's argv in the image (the stand-in run by the image's python in place of
    `vllm`), an OOM at start and the step-down restarting the container with the new flag; the
    default models dir (the sibling of a root 0700 state dir) mounted at /models and read there
    by the image's user; vLLM requires the backend key (VLLM_API_KEY, by name only in argv)."""
    port = free_port()
    plan = plan_serving(
        HostSnapshot.model_validate_json((HOSTS_DIR / "dgx_spark_gb10.json").read_text()),
        None,
        port=port,
    )
    source = (REPO / "tests" / "fakes" / "fake_vllm.py").read_bytes()
    runner = f"import base64; exec(base64.b64decode('{base64.b64encode(source).decode()}'))"
    state = open_tmp / "appliance"
    state.mkdir(mode=0o700)  # root's: secrets
    config = ApplianceConfig.model_validate(
        {"state_dir": state, "sandbox": {"service_user": SERVICE_USER}}
    )
    models = config.resolved_models_dir
    account = sv.prepared_podman_account(config)
    assert models_dir_readable(state / "models", account) is not None  # the old default
    repo = models / "hf" / "hub" / f"models--{plan.model.replace('/', '--')}"
    (repo / "snapshots" / "0").mkdir(parents=True)  # 0755 dirs, 0644 files: as download()
    (repo / "snapshots" / "0" / "config.json").write_text('{"probe": 1}')
    assert models_dir_readable(models, account) is None
    container = ContainerSpec(
        image=image,
        name=f"appliance-backend-fake-{os.getpid()}",
        cache_volume=f"appliance-backend-cache-fake-{os.getpid()}",
        models_dir=models,  # gpu=False, the /models mount on
        account=account,
    )
    key = "backend-key-" + base64.b16encode(os.urandom(8)).decode()
    backend = VllmBackend(
        plan,
        log_path=open_tmp / "vllm.log",
        executable=(IMAGE_PYTHON, "-c", runner),
        hf_home=models / "hf",
        api_key=key,
        container=container,
        extra_env={"FAKE_VLLM_OOM_ABOVE": str(plan.gpu_memory_utilization - 0.01)},
    )
    try:
        backend.launch(timeout=120)  # the warm-up sends the key
        assert [r.setting for r in backend.step_downs] == ["--gpu-memory-utilization"]
        assert backend.models()[0]["id"] == "nemotron"
        assert "--env=FAKE_VLLM_OOM_ABOVE" in backend.spawn_argv()
        util = backend.argv[backend.argv.index("--gpu-memory-utilization") + 1]
        assert util == backend.step_downs[0].value and backend.env["HF_HOME"] == "/models/hf"
        assert f"--volume={models}:/models:ro" in backend.spawn_argv()
        assert "--env=VLLM_API_KEY" in backend.spawn_argv()
        assert key not in " ".join(backend.spawn_argv()) and key not in backend.command_line()
        assert key not in Path(f"/proc/{backend.pid}/cmdline").read_text()
        seen = user_podman(
            "exec", "--user=10001", container.name,
            "cat", f"/models/hf/hub/{repo.name}/snapshots/0/config.json",
        )  # fmt: skip
        assert seen.returncode == 0 and seen.stdout == '{"probe": 1}', seen.stderr
        url = f"{backend.api_base}/completions"
        body = {"model": "nemotron", "prompt": "hi", "max_tokens": 1}
        assert httpx.post(url, json=body, timeout=30).status_code == 401  # no key: refused
        assert httpx.get(f"{backend.base_url}/metrics", timeout=10).status_code == 200
        assert httpx.post(url, json=body, headers=backend.auth_headers(), timeout=30).is_success
    finally:
        backend.stop(grace=5)
        user_podman("volume", "rm", "--force", container.cache_volume)
    assert containers_named(container.name) == []


def test_remove_backend_container_takes_what_a_dead_supervisor_left(
    image: str, open_tmp: Path
) -> None:
    """`appliance down` with no supervisor: this state dir's container removed, idempotently."""
    config = ApplianceConfig.model_validate(
        {"state_dir": open_tmp / "state", "sandbox": {"service_user": SERVICE_USER}}
    )
    name = sv.container_name(config.state_dir)
    done = user_podman("create", "--name", name, "--entrypoint=/bin/true", image)
    assert done.returncode == 0, done.stderr
    assert containers_named(name) == [name]
    assert sv.remove_backend_container(config) is None
    assert containers_named(name) == []
    assert sv.remove_backend_container(config) is None  # nothing there: still fine


def test_down_without_a_supervisor_removes_the_leftover_container(
    image: str, open_tmp: Path
) -> None:
    """A supervisor killed -9 leaves its backend container: `appliance down` removes it."""
    import sys

    state = open_tmp / "state"
    name = sv.container_name(state)
    done = user_podman("create", "--name", name, "--entrypoint=/bin/true", image)
    assert done.returncode == 0, done.stderr
    env = {**os.environ, "APPLIANCE_SANDBOX__SERVICE_USER": SERVICE_USER}
    down = subprocess.run(
        [sys.executable, "-m", "appliance", "--state-dir", str(state), "down"],
        capture_output=True, text=True, timeout=120, env=env, cwd=REPO,
    )  # fmt: skip
    assert down.returncode == 0, down.stderr
    assert "not running" in down.stdout and "warning" not in down.stderr, down.stderr
    assert containers_named(name) == []
