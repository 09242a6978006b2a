"""Quadlet files for the appliance image: golden files, and what the files must and must not say.

UPDATE_GOLDEN=1 pytest tests/unit/test_quadlet_units.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from appliance.cli.main import app, main
from appliance.errors import PreflightError
from appliance.packaging import appliance_image as ai
from appliance.services import quadlet as q
from tests.helpers import assert_golden

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "units" / "quadlet"
MODELS = Path("/var/lib/appliance/models")
TARGETS = sorted(q.RUNTIMES)
runner = CliRunner()

# The [Container] keys of Podman 4.5's Quadlet (podman-systemd.unit(5) of 4.5; 4.4 had all
# but the Health*= keys). A key from a later Podman (ShmSize=, Notify=healthy needs 5.x,
# ReadOnlyTmpfs=, Pull=, StopTimeout=) would make the generator on an older host reject the file.
QUADLET_4_5_KEYS = {
    "AddCapability", "AddDevice", "Annotation", "ContainerName", "DropCapability",
    "Environment", "EnvironmentFile", "EnvironmentHost", "Exec", "ExposeHostPort", "Group",
    "HealthCmd", "HealthInterval", "HealthOnFailure", "HealthRetries", "HealthStartPeriod",
    "HealthStartupCmd", "HealthStartupInterval", "HealthStartupRetries", "HealthStartupSuccess",
    "HealthStartupTimeout", "HealthTimeout", "Image", "IP", "IP6", "Label", "LogDriver", "Mount",
    "Network", "NoNewPrivileges", "Notify", "PodmanArgs", "PublishPort", "ReadOnly",
    "RemapGid", "RemapUid", "RemapUidSize", "RemapUsers", "Rootfs", "RunInit", "Secret",
    "SeccompProfile", "SecurityLabelDisable", "SecurityLabelFileType", "SecurityLabelLevel",
    "SecurityLabelType", "Timezone", "Tmpfs", "User", "UserNS", "VolatileTmp", "Volume",
}  # fmt: skip
# How Quadlet turns each key we use into `podman run` flags (podman-systemd.unit(5)), written
# out here independently of the module's table.
QUADLET_FLAGS = {
    "ContainerName": lambda v: [f"--name={v}"],
    "Image": lambda v: [],
    "PublishPort": lambda v: [f"--publish={v}"],
    "Volume": lambda v: [
        "--volume=" + ("systemd-" + v.replace(".volume:", ":", 1) if ".volume:" in v else v)
    ],
    "AddDevice": lambda v: [f"--device={v}"],
    "Environment": lambda v: [f"--env={v}"],
    "NoNewPrivileges": lambda v: ["--security-opt=no-new-privileges"] if v == "true" else [],
    "DropCapability": lambda v: [f"--cap-drop={c.lower()}" for c in v.split()],
    "ReadOnly": lambda v: ["--read-only"] if v == "true" else [],
    "VolatileTmp": lambda v: ["--read-only-tmpfs=true"] if v == "true" else [],
    "HealthCmd": lambda v: [f"--health-cmd={v}"],
    "HealthInterval": lambda v: [f"--health-interval={v}"],
    "HealthTimeout": lambda v: [f"--health-timeout={v}"],
    "HealthRetries": lambda v: [f"--health-retries={v}"],
    "HealthStartPeriod": lambda v: [f"--health-start-period={v}"],
    "PodmanArgs": lambda v: v.split(),
}


def spec(target: str) -> q.QuadletSpec:
    return q.spec_for(f"localhost/appliance-{target}:latest", models_dir=MODELS)


def parse_unit(text: str) -> list[tuple[str, list[tuple[str, str]]]]:
    """A unit file as systemd reads it: sections of key=value lines, keys may repeat."""
    sections: list[tuple[str, list[tuple[str, str]]]] = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            sections.append((line[1:-1], []))
            continue
        key, sep, value = line.partition("=")
        assert sections and sep and key.strip() == key and key, f"line {n}: {line!r}"
        sections[-1][1].append((key, value))
    return sections


def section(text: str, name: str) -> list[tuple[str, str]]:
    return dict(parse_unit(text))[name]


def rendered(target: str) -> dict[str, str]:
    s = spec(target)
    files = q.render_quadlet(s)
    files["podman-run.json"] = json.dumps(s.podman_run_argv(), indent=2) + "\n"
    return files


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name", ["appliance-inference.container", "appliance-state.volume"])
def test_quadlet_matches_its_golden_file(target: str, name: str) -> None:
    _golden(target, name)


@pytest.mark.parametrize("target", TARGETS)
def test_podman_run_argv_matches_its_golden_file(target: str) -> None:
    _golden(target, "podman-run.json")


def _golden(target: str, name: str) -> None:
    assert_golden(GOLDEN / target / name, rendered(target)[name])


@pytest.mark.parametrize("target", TARGETS)
def test_files_parse_as_units_with_the_expected_sections(target: str) -> None:
    files = q.render_quadlet(spec(target))
    assert sorted(files) == ["appliance-inference.container", "appliance-state.volume"]
    container = parse_unit(files["appliance-inference.container"])
    assert [name for name, _ in container] == ["Unit", "Container", "Service", "Install"]
    volume = parse_unit(files["appliance-state.volume"])
    assert [name for name, _ in volume] == ["Unit", "Volume"]
    service = dict(section(files["appliance-inference.container"], "Service"))
    assert service["Restart"] == "always"
    assert int(service["TimeoutStartSec"]) >= 15 * 60  # a Super NVFP4 load on a Spark
    install = dict(section(files["appliance-inference.container"], "Install"))
    assert install["WantedBy"].split() == ["multi-user.target", "default.target"]


@pytest.mark.parametrize("target", TARGETS)
def test_only_keys_podman_4_5_knows(target: str) -> None:
    text = q.render_container(spec(target))
    keys = {k for k, _ in section(text, "Container")}
    assert keys <= QUADLET_4_5_KEYS, keys - QUADLET_4_5_KEYS
    assert "Notify" not in keys  # Notify=healthy is Podman 5: a documented drop-in
    assert {k for k, _ in section(q.render_state_volume(), "Volume")} <= {"User", "Group", "Label"}
    assert f">= {q.MIN_PODMAN[0]}.{q.MIN_PODMAN[1]}" in text.splitlines()[1]


@pytest.mark.parametrize("target", TARGETS)
def test_the_file_and_the_argv_say_the_same(target: str) -> None:
    s = spec(target)
    settings = s.settings()
    assert [(x.key, x.value) for x in settings] == section(q.render_container(s), "Container")
    argv = s.podman_run_argv()
    assert argv[:2] == ["podman", "run"] and argv[-1] == s.image
    expected = [flag for x in settings for flag in QUADLET_FLAGS[x.key](x.value)]
    assert argv[2:-1] == expected
    assert f"--volume=systemd-appliance-state:{q.STATE_MOUNT}" in argv


@pytest.mark.parametrize("target", TARGETS)
def test_the_container_is_confined(target: str) -> None:
    s = spec(target)
    keys = section(q.render_container(s), "Container")
    got = dict(keys)
    assert got["NoNewPrivileges"] == "true"
    assert got["DropCapability"] == "ALL"
    assert got["ReadOnly"] == "true"
    assert got["VolatileTmp"] == "true"  # keeps --read-only's tmpfs on Podman 4.5-4.7
    assert not {"AddCapability", "Network", "SecurityLabelDisable", "UserNS"} & set(got)
    argv = " ".join(s.podman_run_argv())
    for flag in ("--privileged", "--ipc=host", "--network=host", "--pid=host", "--cap-add"):
        assert flag not in argv
    assert ("AddDevice", "nvidia.com/gpu=all") in keys if s.runtime.gpu else "AddDevice" not in got
    models = [v for k, v in keys if k == "Volume" and v.endswith(f":{q.MODELS_MOUNT}:ro")]
    assert models == ([f"{MODELS}:{q.MODELS_MOUNT}:ro"] if s.runtime.gpu else [])
    shm = ("PodmanArgs", f"--shm-size={q.GPU_SHM_SIZE}")
    assert (shm in keys) == s.runtime.gpu
    assert ("PodmanArgs", "--pull=never") in keys  # offline: no pull at start


@pytest.mark.parametrize("target", TARGETS)
def test_no_value_carries_a_systemd_specifier_or_variable(target: str) -> None:
    # Quadlet copies values into ExecStart, where systemd expands % and $.
    for key, value in section(q.render_container(spec(target)), "Container"):
        assert "%" not in value and "$" not in value, (key, value)


def test_a_non_loopback_publish_needs_the_explicit_option() -> None:
    for address in ("0.0.0.0", "192.168.1.10", "::", "10.0.0.1"):
        with pytest.raises(q.UnitsError, match="beyond this host"):
            q.spec_for("localhost/appliance-cpu:latest", publish_address=address)
    lan = q.spec_for(
        "localhost/appliance-cpu:latest", publish_address="0.0.0.0", allow_non_loopback=True
    )
    assert ("PublishPort", "0.0.0.0:8080:8080") in section(q.render_container(lan), "Container")
    v6 = q.spec_for("localhost/appliance-cpu:latest", publish_address="::1", host_port=9000)
    assert ("PublishPort", "[::1]:9000:8080") in section(q.render_container(v6), "Container")
    with pytest.raises(q.UnitsError, match="not an IP address"):
        q.spec_for("localhost/appliance-cpu:latest", publish_address="localhost")


def test_cli_publishes_the_configured_port_on_loopback_only(isolated_env: Path) -> None:
    cfg = isolated_env / "etc" / "appliance.yaml"
    cfg.parent.mkdir(parents=True)
    cfg.write_text("gateway:\n  host: 0.0.0.0\n  port: 9000\n")  # the host-install listen
    result = runner.invoke(
        app, ["units", "render", "--container", "localhost/appliance-cpu:latest", "--json"]
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    container = out["files"]["appliance-inference.container"]
    assert ("PublishPort", "127.0.0.1:9000:8080") in section(container, "Container")
    assert "--publish=127.0.0.1:9000:8080" in out["podman_run"]
    assert out["target"] == "cpu" and out["min_podman"] == "4.5"
    code = main(
        ["units", "render", "--container", "localhost/appliance-cpu:latest",
         "--publish-address", "0.0.0.0"]
    )  # fmt: skip
    assert code == 1


def test_no_secret_reaches_the_files(isolated_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "sk-test-0123456789abcdef"
    key_file = isolated_env / "upstream.key"
    key_file.write_text(secret + "\n")
    cfg = isolated_env / "etc" / "appliance.yaml"  # read by the CLI, and mounted
    cfg.parent.mkdir(parents=True)
    cfg.write_text(
        "gateway:\n  upstream:\n    base_url: https://example.invalid/v1\n"
        f"    api_key_env: UPSTREAM_KEY\n    api_key_file: {key_file}\n"
    )
    monkeypatch.setenv("UPSTREAM_KEY", secret)
    result = runner.invoke(
        app,
        ["units", "render", "--container", "localhost/appliance-rtx:latest",
         "--models-dir", str(MODELS), "--config-file", str(cfg), "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert secret not in result.stdout and str(key_file) not in result.stdout
    container = json.loads(result.stdout)["files"]["appliance-inference.container"]
    keys = section(container, "Container")
    # The one variable the file sets; the config file is mounted, not copied in.
    assert [v for k, v in keys if k in ("Environment", "EnvironmentFile", "Secret")] == [
        f"APPLIANCE_GATEWAY__PORT={q.CONTAINER_PORT}"
    ]
    assert ("Volume", f"{cfg}:{q.CONFIG_MOUNT}:ro") in keys
    assert "UPSTREAM_KEY" not in container


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"image": "localhost/appliance-cpu:latest\nExec=sh"}, "not an image reference"),
        ({"image": "localhost/appliance cpu"}, "not an image reference"),
        ({"image": "localhost/appliance-cpu:%n"}, "not an image reference"),
        ({"image": "localhost/other:latest"}, "cannot tell the target"),
        ({"image": "x:y", "target": "tpu"}, "unknown target"),
        ({"image": "localhost/appliance-spark:latest"}, "no models dir"),
        ({"image": "localhost/appliance-rtx:1", "models_dir": Path("models")}, "absolute path"),
        ({"image": "localhost/appliance-rtx:1", "models_dir": Path("/srv/my models")}, "spaces"),
        ({"image": "localhost/appliance-rtx:1", "models_dir": Path("/srv/%h")}, "absolute"),
        ({"image": "localhost/appliance-cpu:1", "host_port": 0}, "out of range"),
    ],
)
def test_unsafe_or_wrong_values_are_refused(kwargs: dict, match: str) -> None:
    image = kwargs.pop("image")
    with pytest.raises(q.UnitsError, match=match):
        q.spec_for(image, **kwargs)


def test_target_comes_from_the_builders_repository_name() -> None:
    assert q.target_from_image("localhost/appliance-spark:3f0087d3eadf") == "spark"
    assert q.target_from_image("registry.example/x/appliance-rtx@sha256:ab") == "rtx"
    assert q.spec_for("my/image:1", target="cpu").target == "cpu"


def test_every_image_target_has_a_runtime() -> None:
    assert sorted(q.RUNTIMES) == sorted(ai.TARGETS)


@pytest.mark.parametrize("target", TARGETS)
def test_settings_follow_the_recipe(target: str) -> None:
    """The port, volumes, user and health check period are the Containerfile's."""
    final = ai.read_recipe(ai.target(target)).final
    assert [int(p) for i in final.all("EXPOSE") for p in i.args.split()] == [q.CONTAINER_PORT]
    volumes = [v for i in final.all("VOLUME") for v in json.loads(i.args)]
    gpu = q.RUNTIMES[target].gpu
    assert volumes == ([q.STATE_MOUNT, q.MODELS_MOUNT] if gpu else [q.STATE_MOUNT])
    assert final.env.get("APPLIANCE_GATEWAY__HOST") == "0.0.0.0"  # a published port reaches it
    options, check = ai.read_recipe(ai.target(target)).healthcheck() or ({}, [])
    assert options["start-period"] == q.RUNTIMES[target].health_start_period
    assert check[0] == q.HEALTH_CMD.split()[0]  # the venv's python
    assert "/health/ready" in check[-1] and "/health/ready" in q.HEALTH_CMD


def test_install_refuses_a_podman_without_quadlet(
    isolated_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(PreflightError, match=r"Podman 4\.3 cannot run"):
        q.check_quadlet_host((4, 3))
    with pytest.raises(PreflightError, match="not installed"):
        q.check_quadlet_host(None)
    q.check_quadlet_host((4, 9))
    q.check_quadlet_host((5, 2))
    assert q.parse_podman_version("podman version 4.3.1") == (4, 3)
    monkeypatch.setattr(q, "QUADLET_DIR", isolated_env / "quadlet")
    monkeypatch.setattr(q, "podman_version", lambda: (4, 3))
    code = main(["units", "install", "--container", "localhost/appliance-cpu:latest"])
    assert code == 6  # PreflightError
    assert not (isolated_env / "quadlet").exists()
