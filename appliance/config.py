"""Layered configuration: built-in defaults -> /etc/appliance/appliance.yaml ->
$XDG_CONFIG_HOME/appliance/appliance.yaml -> $APPLIANCE_CONFIG -> APPLIANCE_* env -> flags.

Nested keys in the environment use a double underscore: APPLIANCE_GATEWAY__PORT=9000.
Environment values are read as YAML scalars, so `0.85` is a float and `[a, b]` a list.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from appliance.errors import ConfigError
from appliance.notify_events import EVENTS
from hardware.plan_types import PlanOverrides
from inference.gateway.settings import (
    BACKEND_KEY_ENV,
    GatewaySettings,
    ListenerLimits,
    Price,
    UpstreamSettings,
)
from sandbox.proxy.options import DEFAULT_MAX_PENDING
from sandbox.yamlfile import (
    Provenance,
    YamlError,
    deep_merge,
    load_yaml,
    validation_message,
)

SYSTEM_CONFIG = Path("/etc/appliance/appliance.yaml")
ENV_PREFIX = "APPLIANCE_"
# Variables that steer the CLI itself, or the scripts (setup.sh, appliance-up.sh, whose
# environment every `appliance` they run inherits), rather than naming a config key.
_NOT_CONFIG = {
    "APPLIANCE_CONFIG",
    "APPLIANCE_DEBUG",
    "APPLIANCE_SYSTEM_CONFIG",
    "APPLIANCE_NO_AGENT",
    "APPLIANCE_NO_SANDBOX",
    "APPLIANCE_VENV",
    BACKEND_KEY_ENV,  # the supervisor hands its gateway the backend's key (a secret, not config)
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or `localhost`: reachable from this host only."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class ListenConfig(_Strict):
    host: str = "127.0.0.1"  # loopback only unless the operator says otherwise
    port: int = Field(ge=1, le=65535)


class GatewayConfig(ListenConfig):
    """inference.local: where it listens, and the gateway settings that are not derived."""

    port: int = Field(default=8080, ge=1, le=65535)
    aliases: dict[str, str] = Field(default_factory=dict)
    upstream: UpstreamSettings | None = None
    prices: dict[str, Price] = Field(default_factory=dict)
    budget_warn_ratio: float = Field(default=0.8, gt=0, le=1)
    request_timeout_s: float = Field(default=600.0, gt=0)
    # the listener's limits: body cap, header/body timeouts, connections per client address
    limits: ListenerLimits = Field(default_factory=ListenerLimits)


class ContainerConfig(_Strict):
    """The backend inside the appliance image, under Podman (appliance/packaging/recipes/):
    `backend: container`, or `auto` on a GPU host whose venv has no `vllm`."""

    image: str | None = None  # default: localhost/appliance-<target>:latest
    target: Literal["spark", "rtx", "cpu"] | None = None  # default: from the host (target_for)


class InferenceConfig(_Strict):
    # auto: what the planner picks (vLLM on a GPU, in the appliance image when the venv has no
    # vllm; else the embedded model); container: the planner's pick, in the appliance image
    backend: Literal["auto", "vllm", "embedded", "container"] = "auto"
    served_model_name: str = "nemotron"
    embedded_model: str | None = None  # a local HF dir or GGUF; default: SmolLM2-135M
    # the embedded model's context; past its native length (SmolLM2: 8,192) RoPE is NTK-scaled
    embedded_context: int = Field(default=32768, ge=256)
    offline: bool = True  # HF_HUB_OFFLINE=1: models come from disk, nothing is fetched
    ready_timeout_s: float = Field(default=1800.0, gt=0)  # real model loads take minutes
    vllm: PlanOverrides = Field(default_factory=PlanOverrides)  # planner overrides
    backend_listen: ListenConfig = Field(default_factory=lambda: ListenConfig(port=8000))
    container: ContainerConfig = Field(default_factory=ContainerConfig)


class SandboxConfig(_Strict):
    service_user: str = "appliance"  # rootless Podman runs as this user
    # The egress proxies parse the sandboxes' HTTP as this user, with no capabilities. Never
    # root, never service_user (it owns the Podman socket): it needs to own no file at all.
    proxy_user: str = "nobody"
    # Per sandbox: past this many approvals waiting for the operator, new ones are refused.
    max_pending_approvals: int = Field(default=DEFAULT_MAX_PENDING, ge=1, le=1000)


class ControlConfig(_Strict):
    """The control plane's API: always on <state_dir>/run/control.sock; also on this loopback
    port for operator tokens (`port: null` turns the port off)."""

    host: str = "127.0.0.1"
    port: int | None = Field(default=8070, ge=1, le=65535)
    # The port takes operator tokens that can change everything: only loopback, unless the
    # operator says otherwise here (as `units render --allow-non-loopback` for the gateway).
    allow_non_loopback: bool = False

    @model_validator(mode="after")
    def _loopback_only(self) -> ControlConfig:
        if self.port is not None and not is_loopback(self.host) and not self.allow_non_loopback:
            raise ValueError(
                f"host {self.host!r} is not a loopback address: the control plane's port would "
                "be reachable from other hosts; use 127.0.0.1 (or ::1), or set "
                "control.allow_non_loopback: true to mean it"
            )
        return self


class BlueprintsConfig(_Strict):
    dirs: list[Path] = Field(default_factory=list)  # operators' own <name>/<version>/ trees


HOOK_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


def _web_url(value: str) -> str:
    """An absolute http(s) URL with a host and no credentials in it (those go in a secret)."""
    if any(c.isspace() or not c.isprintable() for c in value):
        raise ValueError(f"{value!r} has whitespace or control characters in it")
    parsed = urlsplit(value)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ValueError(f"{value!r} is not an http:// or https:// URL with a host")
    if parsed.username is not None or parsed.password is not None:
        raise ValueError("credentials in the URL would show in status: use secret_env/secret_file")
    return value


def _known_event(name: str) -> str:
    if name not in EVENTS:
        raise ValueError(f"unknown event {name!r} (known: {', '.join(EVENTS)})")
    return name


class WebhookConfig(_Strict):
    """One receiver of notifications (appliance/control/notify/). The secret is read at each
    delivery from its variable or file, never stored or shown."""

    name: str
    url: Annotated[str, AfterValidator(_web_url)]
    events: list[Annotated[str, AfterValidator(_known_event)]] = Field(min_length=1)
    format: Literal["json", "slack", "ntfy"] = "json"
    secret_env: str | None = Field(default=None, min_length=1)
    secret_file: Path | None = None
    timeout_s: float = Field(default=10.0, gt=0, le=120)

    @field_validator("name")
    @classmethod
    def _slug(cls, value: str) -> str:
        if not HOOK_NAME.match(value):
            raise ValueError(
                f"{value!r} is not a webhook name: 1-63 of a-z 0-9 _ -, starting with a-z or 0-9"
            )
        return value

    @model_validator(mode="after")
    def _one_secret(self) -> WebhookConfig:
        if self.secret_env is not None and self.secret_file is not None:
            raise ValueError(f"webhook {self.name!r}: give secret_env or secret_file, not both")
        if self.format == "json" and self.secret_env is None and self.secret_file is None:
            raise ValueError(
                f"webhook {self.name!r}: a json webhook's bodies are signed: "
                "give secret_env or secret_file"
            )
        return self


class NotifyConfig(_Strict):
    webhooks: list[WebhookConfig] = Field(default_factory=list)
    # approval.pending links carry a signed, single-use token that approves once (one_tap.py)
    one_tap: bool = False
    # the console as the receivers' readers reach it (e.g. through a reverse proxy); default:
    # http://<control.host>:<control.port>
    console_url: Annotated[str, AfterValidator(_web_url)] | None = None

    @field_validator("webhooks")
    @classmethod
    def _unique_names(cls, hooks: list[WebhookConfig]) -> list[WebhookConfig]:
        seen: set[str] = set()
        for hook in hooks:
            if hook.name in seen:
                raise ValueError(f"two webhooks are named {hook.name!r}")
            seen.add(hook.name)
        return hooks


def _default_state_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/var/lib/appliance")
    xdg = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(xdg) / "appliance"


class ApplianceConfig(_Strict):
    state_dir: Path = Field(default_factory=_default_state_dir)
    # default: <state_dir>-models, the state dir's sibling: weights are public data the
    # backend's rootless Podman mounts, the state dir (root 0700) holds secrets.
    models_dir: Path | None = None
    gateway: GatewayConfig = Field(default_factory=GatewayConfig)
    inference: InferenceConfig = Field(default_factory=InferenceConfig)
    sandbox: SandboxConfig = Field(default_factory=SandboxConfig)
    blueprints: BlueprintsConfig = Field(default_factory=BlueprintsConfig)
    control: ControlConfig = Field(default_factory=ControlConfig)
    notify: NotifyConfig = Field(default_factory=NotifyConfig)

    @property
    def resolved_models_dir(self) -> Path:
        return self.models_dir or self.state_dir.with_name(self.state_dir.name + "-models")

    def gateway_settings(self) -> GatewaySettings:
        """The gateway's settings: the configured ones plus those derived from `inference`."""
        listen = self.inference.backend_listen
        try:
            return GatewaySettings(
                backend_url=f"http://{listen.host}:{listen.port}",
                served_model_name=self.inference.served_model_name,
                # `default` is what blueprints ask for unless the operator maps it elsewhere.
                aliases={"default": self.inference.served_model_name, **self.gateway.aliases},
                **self.gateway.model_dump(exclude={"host", "port", "aliases"}),
            )
        except ValidationError as exc:
            raise ConfigError(f"gateway: {exc.errors()[0]['msg']}") from None


def config_files(environ: Mapping[str, str] | None = None) -> list[Path]:
    """The config files consulted, lowest precedence first (they need not exist)."""
    env = os.environ if environ is None else environ
    xdg = env.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    files = [
        Path(env.get("APPLIANCE_SYSTEM_CONFIG", str(SYSTEM_CONFIG))),
        Path(xdg) / "appliance" / "appliance.yaml",
    ]
    if env.get("APPLIANCE_CONFIG"):
        files.append(Path(env["APPLIANCE_CONFIG"]))
    return files


def _env_layer(env: Mapping[str, str]) -> tuple[dict[str, Any], Provenance]:
    data: dict[str, Any] = {}
    provenance: Provenance = {}
    for name, raw in sorted(env.items()):
        if not name.startswith(ENV_PREFIX) or name in _NOT_CONFIG:
            continue
        path = tuple(name[len(ENV_PREFIX) :].lower().split("__"))
        try:
            value = yaml.safe_load(raw) if raw else raw
        except yaml.YAMLError:
            value = raw
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"env {name}: conflicts with another APPLIANCE_* variable")
        node[path[-1]] = value
        provenance[path] = f"env {name}"
    return data, provenance


def check_config_file(path: Path) -> None:
    """The file named by --config or APPLIANCE_CONFIG must exist: never silently skipped."""
    if not path.is_file():
        raise ConfigError(
            f"{path}: no such config file (named by --config or APPLIANCE_CONFIG)",
            hint="give the path of an existing YAML file, or leave --config out",
        )


def load_config(
    flags: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> ApplianceConfig:
    """Merge every layer and validate once, so each error can name the layer that caused it.

    `flags` is a nested mapping like {"gateway": {"port": 9000}}; None values are ignored.
    """
    env = os.environ if environ is None else environ
    merged: dict[str, Any] = {}
    provenance: Provenance = {}
    if env.get("APPLIANCE_CONFIG"):
        check_config_file(Path(env["APPLIANCE_CONFIG"]))
    for path in config_files(env):
        if path.is_file():
            try:
                data, where = load_yaml(path)
            except YamlError as exc:
                raise ConfigError(str(exc)) from None
            merged = deep_merge(merged, data)
            provenance.update(where)
    data, where = _env_layer(env)
    merged = deep_merge(merged, data)
    provenance.update(where)
    if flags:
        flag_data = _drop_none(flags)
        merged = deep_merge(merged, flag_data)
        provenance.update({p: f"flag {'.'.join(map(str, p))}" for p in _leaf_paths(flag_data)})
    try:
        return ApplianceConfig.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(validation_message(exc, provenance, "config")) from None


def _drop_none(data: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            value = _drop_none(value)
            if value:
                out[key] = value
        elif value is not None:
            out[key] = value
    return out


def _leaf_paths(data: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths: list[tuple[str, ...]] = []
    for key, value in data.items():
        if isinstance(value, Mapping):
            paths.extend(_leaf_paths(value, (*prefix, key)))
        else:
            paths.append((*prefix, key))
    return paths
