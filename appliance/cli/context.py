"""Per-invocation state handed to commands: the global flags and the config, loaded once."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import typer

from appliance.config import ApplianceConfig, load_config

if TYPE_CHECKING:
    from appliance.control.client import ControlClient


@dataclass
class AppContext:
    flags: dict[str, Any] = field(default_factory=dict)
    _config: ApplianceConfig | None = None

    def config(self, **extra_flags: Any) -> ApplianceConfig:
        """The merged config; `extra_flags` are a command's own flags (nested mapping)."""
        if extra_flags:
            from sandbox.yamlfile import deep_merge

            return load_config(deep_merge(self.flags, extra_flags))
        if self._config is None:
            self._config = load_config(self.flags)
        return self._config


def app_context(ctx: typer.Context) -> AppContext:
    obj = ctx.find_root().obj
    if not isinstance(obj, AppContext):
        obj = AppContext()
        ctx.find_root().obj = obj
    return obj


def control_client(ctx: typer.Context) -> ControlClient:
    """The control plane's API client: every command that changes state goes through it (when
    nothing answers, its calls raise ControlPlaneDown: exit 7, hint `appliance up`)."""
    from appliance.control.client import ControlClient  # lazy: httpx only for those commands

    return ControlClient(app_context(ctx).config())
