"""Layered config: precedence of every layer, and errors that name file:line."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.config import ApplianceConfig, config_files, load_config
from appliance.errors import ConfigError


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_defaults_are_loopback_only(tmp_path: Path) -> None:
    config = load_config()
    assert config.gateway.host == "127.0.0.1"
    assert config.inference.backend_listen.host == "127.0.0.1"
    assert config.state_dir == tmp_path / "state"
    # the state dir's sibling: the state dir is 0700 (secrets), the backend's Podman mounts this
    assert config.resolved_models_dir == tmp_path / "state-models"
    assert ApplianceConfig(state_dir=Path("/var/lib/appliance")).resolved_models_dir == Path(
        "/var/lib/appliance-models"
    )


def test_each_layer_overrides_the_one_below(tmp_path: Path, monkeypatch) -> None:
    write(
        tmp_path / "etc" / "appliance.yaml", "gateway: {port: 1001}\nsandbox: {service_user: a}\n"
    )
    write(tmp_path / "xdg" / "appliance" / "appliance.yaml", "gateway:\n  port: 1002\n")
    extra = write(tmp_path / "extra.yaml", "inference:\n  served_model_name: mine\n")
    monkeypatch.setenv("APPLIANCE_CONFIG", str(extra))
    config = load_config()
    assert config.gateway.port == 1002  # XDG over /etc
    assert config.sandbox.service_user == "a"  # /etc survives where nothing overrides it
    assert config.inference.served_model_name == "mine"

    monkeypatch.setenv("APPLIANCE_GATEWAY__PORT", "1003")
    assert load_config().gateway.port == 1003  # env over files
    assert load_config({"gateway": {"port": 1004}}).gateway.port == 1004  # flags over env
    assert load_config({"gateway": {"port": None}}).gateway.port == 1003  # unset flags ignored


def test_env_values_are_typed_yaml_scalars(monkeypatch) -> None:
    monkeypatch.setenv("APPLIANCE_INFERENCE__VLLM__GPU_MEMORY_UTILIZATION", "0.75")
    monkeypatch.setenv("APPLIANCE_INFERENCE__VLLM__EXTRA_ARGS", "[--enforce-eager]")
    vllm = load_config().inference.vllm
    assert vllm.gpu_memory_utilization == 0.75
    assert vllm.extra_args == ["--enforce-eager"]


def test_bad_value_names_file_and_line(tmp_path: Path) -> None:
    path = write(
        tmp_path / "xdg" / "appliance" / "appliance.yaml",
        "# comment\ngateway:\n  host: 127.0.0.1\n  port: not-a-port\n",
    )
    with pytest.raises(ConfigError) as exc:
        load_config()
    assert str(exc.value).startswith(f"{path}:4: gateway.port: ")


def test_unknown_key_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path / "etc" / "appliance.yaml", "gateway:\n  port: 80\n  hots: x\n")
    with pytest.raises(ConfigError, match=rf"^{path}:3: gateway.hots: unknown field"):
        load_config()


def test_yaml_syntax_error_names_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path / "etc" / "appliance.yaml", "gateway:\n  port: [1,\n")
    with pytest.raises(ConfigError, match=rf"^{path}:\d+:\d+: "):
        load_config()


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    path = write(tmp_path / "etc" / "appliance.yaml", "- a\n- b\n")
    with pytest.raises(ConfigError, match=rf"^{path}:1: expected a mapping"):
        load_config()


def test_bad_env_value_names_the_variable(monkeypatch) -> None:
    monkeypatch.setenv("APPLIANCE_INFERENCE__VLLM__GPU_MEMORY_UTILIZATION", "1.5")
    with pytest.raises(
        ConfigError, match=r"^env APPLIANCE_INFERENCE__VLLM__GPU_MEMORY_UTILIZATION: "
    ):
        load_config()


def test_the_backend_key_in_the_gateways_env_is_no_config_key(monkeypatch) -> None:
    """The supervisor starts `appliance serve gateway` with the backend's key in
    APPLIANCE_BACKEND_KEY: the gateway's config load must not take it for a key (nor echo it)."""
    monkeypatch.setenv("APPLIANCE_BACKEND_KEY", "not-a-config-value")
    config = load_config()
    assert "not-a-config-value" not in config.model_dump_json()


def test_bad_flag_names_the_flag() -> None:
    with pytest.raises(ConfigError, match=r"^flag inference.vllm.max_num_seqs: "):
        load_config({"inference": {"vllm": {"max_num_seqs": 0}}})


def test_empty_file_is_fine(tmp_path: Path) -> None:
    write(tmp_path / "etc" / "appliance.yaml", "# nothing here\n")
    assert load_config().gateway.port == 8080


def test_config_files_order(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("APPLIANCE_CONFIG", str(tmp_path / "x.yaml"))
    files = config_files()
    assert files == [
        tmp_path / "etc" / "appliance.yaml",
        tmp_path / "xdg" / "appliance" / "appliance.yaml",
        tmp_path / "x.yaml",
    ]
