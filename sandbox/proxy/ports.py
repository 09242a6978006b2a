"""What the proxy needs from the host, declared here so `sandbox` never imports `appliance`."""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit

from sandbox.policy import Endpoint


class AuditSink(Protocol):
    """The host's audit log (the control plane's store implements it)."""

    def audit(self, event: str, **fields: Any) -> None: ...


class PolicyWriter(Protocol):
    """Writes a new policy revision allowing `endpoint` (a persisted approval); sync or async."""

    def persist_allow(self, sandbox: str, endpoint: Endpoint) -> Awaitable[None] | None: ...


class Resolver(Protocol):
    """Name → IP strings. Injectable so tests map fake names to loopback."""

    async def __call__(self, host: str, port: int) -> list[str]: ...


@dataclass(frozen=True)
class InferenceRoute:
    """Where `inference.local` goes, and the sandbox's key (never logged, never sent back)."""

    gateway_url: str
    key: str = field(repr=False)

    @property
    def scheme(self) -> str:
        return urlsplit(self.gateway_url).scheme or "http"

    @property
    def host(self) -> str:
        return urlsplit(self.gateway_url).hostname or "127.0.0.1"

    @property
    def port(self) -> int:
        parts = urlsplit(self.gateway_url)
        return parts.port or (443 if parts.scheme == "https" else 80)

    @property
    def netloc(self) -> str:
        return urlsplit(self.gateway_url).netloc

    def path(self, target: str) -> str:
        """The gateway path for a request target (the gateway URL may carry a base path)."""
        base = urlsplit(self.gateway_url).path.rstrip("/")
        return base + (target if target.startswith("/") else "/" + target)
