"""The backend in the appliance image: the `podman run` argv (golden files), hostile values
refused, secrets kept out of argv, where the backend runs (serving_path), and vLLM's load
progress as the status shows it.

Regenerate the goldens after a deliberate change with
    UPDATE_GOLDEN=1 pytest tests/unit/test_backend_container.py
"""

from __future__ import annotations

import json
import os
import pwd
import stat
from pathlib import Path

import pytest

from appliance.config import ApplianceConfig
from appliance.errors import ConfigError
from appliance.services import supervisor as sv
from hardware.plan_types import ServingPlan
from hardware.planner import plan_serving
from hardware.snapshot import HostSnapshot
from inference.backends.base import BackendStartError
from inference.backends.container import (
    ContainerSpec,
    PodmanAccount,
    cache_volume_name,
    container_name,
    models_dir_readable,
)
from inference.backends.vllm import VllmBackend, load_progress
from tests.helpers import GOLDEN, SERVICE_USER, assert_golden

HOSTS_DIR = Path(__file__).resolve().parents[1] / "fixtures" / "hosts"
GOLDEN_DIR = GOLDEN / "argv" / "container"
STATE = Path("/var/lib/appliance")
# target -> (recorded host, platform.machine())
TARGET_HOSTS = {
    "spark": ("dgx_spark_gb10", "aarch64"),
    "rtx": ("rtx_pro_6000_96gb", "x86_64"),
    "cpu": ("cpu_only", "x86_64"),
}


def load_plan(name: str) -> ServingPlan:
    host = HostSnapshot.model_validate_json((HOSTS_DIR / f"{name}.json").read_text())
    return plan_serving(host, None)


def config(**inference: object) -> ApplianceConfig:
    return ApplianceConfig.model_validate(
        {"state_dir": STATE, "inference": inference, "sandbox": {"service_user": SERVICE_USER}}
    )


def spec(**fields: object) -> ContainerSpec:
    base: dict[str, object] = {
        "image": "localhost/appliance-rtx:latest",
        "name": "appliance-backend-0123abcd",
        "cache_volume": "appliance-backend-cache-0123abcd",
        "gpu": True,
        "models_dir": Path("/var/lib/appliance/models"),
    }
    return ContainerSpec(**{**base, **fields})  # type: ignore[arg-type]


def container_backend(target: str):  # type: ignore[no-untyped-def]
    host, machine = TARGET_HOSTS[target]
    cfg, plan = config(backend="container"), load_plan(host)
    made = sv.backend_container(cfg, plan, account=PodmanAccount(), machine=machine)
    return sv.backend_process(cfg, plan, container=made)


# --------------------------------------------------------------------------------------------
# The argv
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", sorted(TARGET_HOSTS))
def test_podman_run_argv_matches_its_golden_file(target: str) -> None:
    proc = container_backend(target)
    assert proc.container is not None and proc.container.image.endswith(f"-{target}:latest")
    assert_golden(GOLDEN_DIR / f"{target}.json", json.dumps(proc.spawn_argv(), indent=2) + "\n")


@pytest.mark.parametrize("target", sorted(TARGET_HOSTS))
def test_the_inner_argv_is_what_the_host_would_run(target: str) -> None:
    """argv stays the inner command (the OOM step-down edits it); the spawned one wraps it."""
    proc = container_backend(target)
    spawned = proc.spawn_argv()
    entry = next(a for a in spawned if a.startswith("--entrypoint="))
    assert entry == f"--entrypoint={proc.argv[0]}"
    image_at = spawned.index(proc.container.image)  # type: ignore[union-attr]
    assert spawned[image_at + 1 :] == proc.argv[1:]
    assert spawned[:4] == ["podman", "--runtime", "runc", "run"]
    names = {a.split("=", 1)[1] for a in spawned if a.startswith("--env=")}
    assert names == set(proc.env)  # every inner variable, by name only


def test_gpu_targets_mount_the_weights_read_only_and_set_hf_home() -> None:
    proc = container_backend("spark")
    assert isinstance(proc, VllmBackend)
    argv = proc.spawn_argv()
    assert "--volume=/var/lib/appliance-models:/models:ro" in argv
    assert "--device=nvidia.com/gpu=all" in argv and "--shm-size=16g" in argv
    assert proc.env["HF_HOME"] == "/models/hf"
    cpu = container_backend("cpu").spawn_argv()
    assert not any(a.startswith(("--device", "--shm-size")) or ":/models" in a for a in cpu)


def test_the_embedded_server_runs_from_the_image_venv_with_its_cache_on_the_volume() -> None:
    proc = container_backend("cpu")
    assert proc.argv[:3] == ["/opt/appliance/venv/bin/python", "-m", "inference.embedded"]
    assert proc.argv[proc.argv.index("--cache-dir") + 1] == "/var/lib/appliance/cache"
    assert f"--volume={cache_volume_name(STATE)}:/var/lib/appliance" in proc.spawn_argv()
    assert proc.warmup_model == "nemotron"


def test_an_embedded_model_path_is_refused_in_the_container() -> None:
    cfg = config(backend="container", embedded_model="/srv/model.gguf")
    with pytest.raises(ConfigError, match="embedded_model"):
        sv.backend_process(cfg, load_plan("cpu_only"), container=spec(gpu=False, models_dir=None))


def test_names_are_per_state_dir() -> None:
    assert container_name(STATE) != container_name("/srv/other")
    assert container_name(STATE).removeprefix("appliance-backend-") == cache_volume_name(
        STATE
    ).removeprefix("appliance-backend-cache-")
    assert len(container_name(STATE)) == len("appliance-backend-") + 8


def test_stop_argv() -> None:
    assert spec().stop_argv(30) == [
        "podman", "--runtime", "runc", "stop", "-t", "30", "appliance-backend-0123abcd",
    ]  # fmt: skip


def test_remove_argv_is_idempotent_and_immediate() -> None:
    assert spec().remove_argv() == [
        "podman", "--runtime", "runc", "rm", "--force", "--time=0", "--ignore",
        "appliance-backend-0123abcd",
    ]  # fmt: skip
    assert PodmanAccount(uid=999).argv("ps", podman="/usr/bin/podman") == [
        "/usr/bin/podman", "--runtime", "runc", "ps",
    ]  # fmt: skip


def test_the_hosts_proxy_variables_stay_out_of_the_container() -> None:
    """podman copies http_proxy & co. into the container unless told not to."""
    for target in TARGET_HOSTS:
        assert "--http-proxy=false" in container_backend(target).spawn_argv()


# --------------------------------------------------------------------------------------------
# The models dir: can the backend's Podman account mount it, and the image's uid read it?
# --------------------------------------------------------------------------------------------


@pytest.fixture
def open_parent():  # type: ignore[no-untyped-def]
    """A 0755 directory under /tmp (pytest's own tmp dirs are 0700: no other user enters)."""
    import shutil
    import tempfile

    made = Path(tempfile.mkdtemp(prefix="models-check-", dir="/tmp"))
    made.chmod(0o755)
    yield made
    shutil.rmtree(made)


def service_account() -> PodmanAccount:
    user = pwd.getpwnam(SERVICE_USER)
    return PodmanAccount(uid=user.pw_uid, gid=user.pw_gid)


def test_models_dir_readable_under_a_root_only_state_dir_is_refused(open_parent: Path) -> None:
    state = open_parent / "appliance"
    state.mkdir(mode=0o700)
    (state / "models").mkdir(mode=0o755)
    why = models_dir_readable(state / "models", service_account())
    assert why is not None and f"cannot enter {state}" in why and SERVICE_USER in why
    sibling = ApplianceConfig(state_dir=state).resolved_models_dir
    sibling.mkdir(mode=0o755)
    assert models_dir_readable(sibling, service_account()) is None


def test_models_dir_readable_names_what_is_wrong(open_parent: Path) -> None:
    models = open_parent / "models"
    assert "No such file" in (models_dir_readable(models, service_account()) or "")
    models.mkdir(mode=0o750)  # root's group only: the image's uid (a subuid) is "other"
    assert "cannot read" in (models_dir_readable(models, service_account()) or "")
    models.chmod(0o755)
    assert models_dir_readable(models, service_account()) is None
    (open_parent / "file").write_text("")
    assert "not a directory" in (models_dir_readable(open_parent / "file", PodmanAccount()) or "")


# --------------------------------------------------------------------------------------------
# Hostile values
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields",
    [
        {"image": "localhost/appliance-rtx:latest --privileged"},
        {"image": "localhost/x\n--privileged"},
        {"image": "--privileged"},
        {"image": ""},
        {"name": "-x"},
        {"name": "a b"},
        {"name": "a/b"},
        {"name": "a\nb"},
        {"cache_volume": "/etc:/var/lib/appliance"},
        {"cache_volume": "--volume=x"},
        {"models_dir": Path("relative/models")},
        {"models_dir": Path("/srv/models:/etc")},
        {"models_dir": Path("/srv/my models")},
        {"models_dir": Path("/srv/models\n")},
        {"podman": "-podman"},
        {"podman": "pod man"},
        {"gpu": True, "models_dir": None},
    ],
)
def test_hostile_values_are_refused(fields: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        spec(**fields)


@pytest.mark.parametrize("inner", [[], ["-x"], ["vllm serve"], ["vllm", "a\nb"], ["\nvllm"]])
def test_hostile_inner_argv_is_refused(inner: list[str]) -> None:
    with pytest.raises(ValueError):
        spec().run_argv(inner)


@pytest.mark.parametrize("name", ["A=B", "1X", "A B", "-e", ""])
def test_hostile_env_names_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="environment variable name"):
        spec().run_argv(["vllm"], [name])


def test_secret_values_never_reach_argv_and_are_masked(tmp_path: Path) -> None:
    secret = "sk-local-0123456789abcdef0123456789abcdef"
    proc = VllmBackend(
        load_plan("rtx_pro_6000_96gb"),
        log_path=tmp_path / "vllm.log",
        api_key=secret,
        hf_home=tmp_path / "hf",
        container=spec(),
    )
    argv = proc.spawn_argv()
    assert not any(secret in a for a in argv)
    assert "--env=VLLM_API_KEY" in argv
    assert proc.spawn_env()["VLLM_API_KEY"] == secret  # podman copies it from its own env
    line = proc.command_line()
    assert secret not in line and "VLLM_API_KEY=***" in line and "podman --runtime runc" in line


def test_the_account_env_replaces_ours_and_popen_drops_to_it() -> None:
    account = PodmanAccount(uid=999, gid=998, env={"HOME": "/h", "XDG_RUNTIME_DIR": "/run/user/9"})
    made = spec(account=account)
    env = made.process_env({"SECRET_OF_ROOT": "x", "HOME": "/root"}, {"HF_HOME": "/models/hf"})
    assert env == {"HOME": "/h", "XDG_RUNTIME_DIR": "/run/user/9", "HF_HOME": "/models/hf"}
    assert account.popen_kwargs(0) == {"user": 999, "group": 998, "extra_groups": []}
    assert account.popen_kwargs(999) == {} and PodmanAccount().popen_kwargs(0) == {}


# --------------------------------------------------------------------------------------------
# Where the backend runs
# --------------------------------------------------------------------------------------------


@pytest.fixture
def path_with_vllm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """PATH = one directory; `put()` adds an executable `vllm` there."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    monkeypatch.setenv("PATH", str(bindir))

    def put(version: str = "0.24.1") -> None:
        exe = bindir / "vllm"
        exe.write_text(f'#!/bin/sh\n[ "$1" = --version ] && echo {version}\n')
        exe.chmod(exe.stat().st_mode | stat.S_IXUSR)

    return put


@pytest.mark.parametrize(
    ("backend", "host", "vllm_on_path", "expected"),
    [
        ("auto", "dgx_spark_gb10", False, "container"),  # the venv has no vllm: the normal case
        ("auto", "dgx_spark_gb10", True, "host"),
        ("auto", "cpu_only", False, "host"),  # the embedded model on the host, as today
        ("container", "cpu_only", False, "container"),
        ("container", "rtx_4090_24gb", True, "container"),
        ("vllm", "rtx_4090_24gb", False, "host"),  # asked for host vLLM: kept
        ("embedded", "cpu_only", False, "host"),
    ],
)
def test_serving_path(
    backend: str, host: str, vllm_on_path: bool, expected: str, path_with_vllm
) -> None:  # type: ignore[no-untyped-def]
    if vllm_on_path:
        path_with_vllm()
    assert sv.serving_path(config(backend=backend), load_plan(host)) == expected


@pytest.mark.parametrize("version", ["0.11.0", "not-a-version"])
def test_auto_takes_the_container_when_the_hosts_vllm_is_too_old(
    version: str, path_with_vllm
) -> None:  # type: ignore[no-untyped-def]
    path_with_vllm(version)
    assert sv.serving_path(config(backend="auto"), load_plan("dgx_spark_gb10")) == "container"
    found, why = sv.host_vllm()
    assert found is None and ("older than" in why or "does not give a version" in why)


def test_a_recorded_host_ignores_this_machines_path(path_with_vllm) -> None:  # type: ignore[no-untyped-def]
    """The dry run of a recorded host must not depend on the reviewing machine's PATH."""
    path_with_vllm()
    plan = load_plan("dgx_spark_gb10")
    assert sv.serving_path(config(backend="auto"), plan) == "host"
    assert sv.serving_path(config(backend="auto"), plan, recorded=True) == "container"
    assert sv.serving_path(config(backend="vllm"), plan, recorded=True) == "host"


def test_backend_process_takes_the_container_path_by_itself(path_with_vllm) -> None:  # type: ignore[no-untyped-def]
    proc = sv.backend_process(config(backend="auto"), load_plan("rtx_4090_24gb"))
    assert proc.container is not None and proc.spawn_argv()[0] == "podman"
    assert proc.argv[:2] == ["vllm", "serve"]
    path_with_vllm()
    host = sv.backend_process(config(backend="auto"), load_plan("rtx_4090_24gb"))
    assert host.container is None and host.spawn_argv() == host.argv


@pytest.mark.parametrize(
    ("target", "host", "machine", "expected"),
    [
        (None, "dgx_spark_gb10", "aarch64", "spark"),
        (None, "rtx_pro_6000_96gb", "x86_64", "rtx"),
        (None, "cpu_only", "x86_64", "cpu"),
        ("rtx", "dgx_spark_gb10", "aarch64", "rtx"),
    ],
)
def test_container_target(target: str | None, host: str, machine: str, expected: str) -> None:
    cfg = config(backend="container", container={"target": target})
    assert sv.container_target(cfg, load_plan(host), machine) == expected


def test_configured_image_wins() -> None:
    cfg = config(backend="container", container={"image": "registry.example/appliance:1.2"})
    made = sv.backend_container(cfg, load_plan("cpu_only"), account=PodmanAccount())
    assert made.image == "registry.example/appliance:1.2"


def test_the_probes_account_lookup_makes_nothing_the_start_does(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from sandbox.lifecycle.podman_service import PodmanService

    made: list[str] = []
    monkeypatch.setattr(PodmanService, "ensure_runtime_dir", lambda self: made.append(self.user))
    probe = sv.podman_account(config())
    assert made == []  # the dry run and doctor are read-only
    start = sv.prepared_podman_account(config())
    assert start == probe
    assert made == ([SERVICE_USER] if os.geteuid() == 0 else [])


def test_podman_account_is_the_service_users_as_root_else_ours() -> None:
    account = sv.prepared_podman_account(config())
    if os.geteuid() != 0:
        assert account == PodmanAccount()
        return
    user = pwd.getpwnam(SERVICE_USER)
    assert (account.uid, account.gid, account.home) == (user.pw_uid, user.pw_gid, user.pw_dir)
    assert account.env is not None and account.env["HOME"] == user.pw_dir
    assert account.env["XDG_RUNTIME_DIR"] == f"/run/user/{user.pw_uid}"
    assert Path(account.env["XDG_RUNTIME_DIR"]).is_dir()


# --------------------------------------------------------------------------------------------
# Weights for the container: the host's <models_dir>/hf/hub
# --------------------------------------------------------------------------------------------


def test_the_weights_check_looks_at_the_hosts_models_dir(tmp_path: Path) -> None:
    plan = load_plan("rtx_4090_24gb")
    proc = VllmBackend(plan, log_path=tmp_path / "l", hf_home=tmp_path / "hf", container=spec())
    with pytest.raises(BackendStartError, match=str(tmp_path / "hf" / "hub")) as caught:
        proc._check_model()
    assert not caught.value.retryable
    snapshot = tmp_path / "hf" / "hub" / f"models--{plan.model.replace('/', '--')}" / "snapshots"
    (snapshot / "abc").mkdir(parents=True)
    proc._check_model()  # present: no error


def test_a_local_model_directory_is_refused_with_a_container(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not mounted"):
        VllmBackend(
            load_plan("rtx_4090_24gb"),
            log_path=tmp_path / "l",
            model_path=tmp_path,
            container=spec(),
        )


# --------------------------------------------------------------------------------------------
# Load progress (real vLLM log lines)
# --------------------------------------------------------------------------------------------

# From vLLM 0.10+ logs: tqdm redraws with \r; multiprocess output is prefixed by its process.
REAL_LINES = [
    (
        "Loading safetensors checkpoint shards:  45% Completed | 9/20 [00:12<00:15,  1.20s/it]\r",
        "loading weights 45% (9/20 shards)",
    ),
    (
        "(EngineCore_DP0 pid=316) \rLoading safetensors checkpoint shards:  40% Completed | 2/5 "
        "[00:56<01:28, 29.36s/it]\r(EngineCore_DP0 pid=316) ",
        "loading weights 40% (2/5 shards)",
    ),
    (
        "(Worker_PP0_TP0_EP0 pid=1947) \nLoading safetensors checkpoint shards:  26% Completed "
        "| 22/85 [02:11<06:16,  5.98s/it]\n",
        "loading weights 26% (22/85 shards)",
    ),
    (
        "Loading safetensors checkpoint shards:   0% Completed | 0/66 [00:00<?, ?it/s]",
        "loading weights 0% (0/66 shards)",
    ),
    (
        "INFO 12-07 21:00:00 [fake_vllm] Loading safetensors checkpoint shards:  75% Completed "
        "| 3/4\n",
        "loading weights 75% (3/4 shards)",
    ),
    (
        "(EngineCore_DP0 pid=316) INFO 08-21 18:34:37 [gpu_model_runner.py:2007] Model loading "
        "took 15.27 GiB and 34.5 seconds\n",
        "INFO 08-21 18:34:37 [gpu_model_runner.py:2007] Model loading took 15.27 GiB and 34.5 "
        "seconds",
    ),
    ("progress 10%\rprogress 20%\rprogress 30%", "progress 30%"),
    ("", ""),
]


@pytest.mark.parametrize(("tail", "shown"), REAL_LINES)
def test_load_progress(tail: str, shown: str) -> None:
    assert load_progress(tail) == shown


@pytest.mark.parametrize(
    ("host", "expected"), [("dgx_spark_gb10", "vllm"), ("cpu_only", "embedded")]
)
def test_backend_container_plans_like_auto(
    host: str, expected: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import click

    from appliance.cli.context import AppContext
    from appliance.cli.plan import current_plan

    snapshot = HostSnapshot.model_validate_json((HOSTS_DIR / f"{host}.json").read_text())
    plans = {}
    for backend in ("auto", "container"):
        monkeypatch.setenv("APPLIANCE_STATE_DIR", str(tmp_path))
        monkeypatch.setenv("APPLIANCE_INFERENCE__BACKEND", backend)
        ctx = click.Context(click.Command("plan"), obj=AppContext())
        plans[backend] = current_plan(ctx, snapshot)  # type: ignore[arg-type]
    assert plans["container"].backend == expected
    assert plans["container"] == plans["auto"]


def test_the_backends_import_nothing_of_appliance_or_sandbox() -> None:
    """inference declares what it needs (PodmanAccount: uid/gid/env handed in by appliance)."""
    import subprocess
    import sys

    code = (
        "import sys, inference.backends, inference.backends.container, inference.backends.warmup;"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('appliance', 'sandbox')))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
