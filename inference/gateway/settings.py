"""Settings of the inference.local gateway; the appliance embeds them in its config (`gateway:`).

No secret ever lives here: the upstream key is named by an environment variable or a file path,
read when the app starts, so `appliance config show` can print these settings safely.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Price(_Strict):
    """Cost per 1M tokens, in whatever currency the operator budgets in."""

    prompt_per_1m: float = Field(0.0, ge=0)
    completion_per_1m: float = Field(0.0, ge=0)


class UpstreamSettings(_Strict):
    """Any OpenAI-compatible server (a remote NVIDIA endpoint, another vLLM)."""

    base_url: str  # up to and including /v1, e.g. https://integrate.api.nvidia.com/v1
    api_key_env: str | None = None  # the NAME of an environment variable holding the key
    api_key_file: Path | None = None  # or a file whose first line is the key
    models: list[str] = Field(default_factory=list)  # what it serves, routed by name
    fallback: bool = False  # send local-model requests here while the local backend is down
    fallback_model: str | None = None  # default: the first of `models`

    @model_validator(mode="after")
    def _check(self) -> UpstreamSettings:
        if self.fallback and not (self.fallback_model or self.models):
            raise ValueError("fallback needs fallback_model or at least one entry in models")
        return self

    def api_key(self) -> str | None:
        if self.api_key_env:
            value = os.environ.get(self.api_key_env)
            if value:
                return value.strip()
        if self.api_key_file is not None:
            lines = self.api_key_file.read_text().strip().splitlines()
            return lines[0].strip() if lines else None
        return None

    @property
    def effective_fallback_model(self) -> str:
        return self.fallback_model or self.models[0]


class ListenerLimits(_Strict):
    """What one client may hold of the gateway's listener (enforced in `inference.gateway.server`
    and, for the body, in `inference.gateway.body`). Every refusal is an OpenAI-shaped error."""

    # Largest request body, however it is framed (Content-Length or chunked): 413 past it.
    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1024)
    # Request line plus headers: 431 past it (a 1 MB Authorization header, say).
    max_header_bytes: int = Field(16 * 1024, ge=1024)
    # From the connection's first byte (or the end of the previous answer) to the end of the
    # headers: 408 and closed past it, however slowly the bytes trickle (slowloris).
    header_timeout_s: float = Field(10.0, gt=0)
    # From the end of the headers to the end of the body: 408 and closed past it. 60 s is 32 MiB
    # at about 0.5 MiB/s.
    body_timeout_s: float = Field(60.0, gt=0)
    # An idle keep-alive connection is closed after this.
    keep_alive_timeout_s: float = Field(5.0, gt=0)
    # Open connections from one client address: a new one past it gets 429 and is closed.
    # Every local client (the sandboxes' egress proxies too) shares 127.0.0.1.
    max_connections_per_client: int = Field(256, ge=1)
    # Open connections in all: 503 past it (keeps the gateway under its file descriptor limit).
    max_connections: int = Field(1024, ge=1)


# The environment variable the supervisor hands the gateway the local backend's key in (a new
# random one per supervisor start: vLLM refuses /v1 requests without it).
BACKEND_KEY_ENV = "APPLIANCE_BACKEND_KEY"


class GatewaySettings(_Strict):
    # The local backend (vLLM or the embedded server; both speak vLLM's routes), without /v1.
    backend_url: str = "http://127.0.0.1:8000"
    # The NAME of the environment variable holding the local backend's key (unset: none sent).
    backend_api_key_env: str | None = BACKEND_KEY_ENV
    served_model_name: str = "nemotron"
    # alias -> model: the served name or an upstream model, e.g. {"default": "nemotron"}
    aliases: dict[str, str] = Field(default_factory=dict)
    upstream: UpstreamSettings | None = None
    prices: dict[str, Price] = Field(default_factory=dict)  # model -> price; absent = free
    budget_warn_ratio: float = Field(0.8, gt=0, le=1)
    request_timeout_s: float = Field(600.0, gt=0)  # longest silence from the backend
    connect_timeout_s: float = Field(3.0, gt=0)
    max_backend_connections: int = Field(512, ge=1)
    # Admission (inference/gateway/admission.py). The local model's context; None: read from
    # the backend's GET /v1/models (vLLM and the embedded server report max_model_len there).
    max_model_len: int | None = Field(None, ge=1)
    # The context assumed for upstream models: bounds a reservation without max_tokens.
    upstream_max_model_len: int = Field(131072, ge=1)
    # Tokens a chat template adds beyond the body's own text (default system prompt, tool
    # preamble); part of the prompt's upper bound (inference/gateway/prompt_bound.py).
    prompt_overhead_tokens: int = Field(256, ge=0)
    limits: ListenerLimits = Field(default_factory=ListenerLimits)

    @model_validator(mode="after")
    def _check_aliases(self) -> GatewaySettings:
        known = {self.served_model_name, *(self.upstream.models if self.upstream else [])}
        for alias, target in self.aliases.items():
            if target not in known:
                raise ValueError(
                    f"alias {alias!r} points at {target!r}, which is neither the served model "
                    "nor an upstream model"
                )
        return self

    def price_table(self) -> dict[str, tuple[float, float]]:
        return {m: (p.prompt_per_1m, p.completion_per_1m) for m, p in self.prices.items()}
