"""Any OpenAI-compatible server elsewhere (a remote NVIDIA endpoint, another vLLM).

The appliance holds its key; the gateway sends it as a header (auth_headers) and it is never
logged or shown (repr leaves it out). Healthy = `GET {api_base}/models` answers 2xx.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from inference.backends.base import (
    BackendMetrics,
    BackendStopped,
    BackendTimeout,
    BackendUnavailable,
    ProgressCallback,
    fetch_models,
    http_get,
    parse_metrics,
)


class UpstreamBackend:
    def __init__(
        self,
        api_base: str,
        *,
        api_key: str | None = None,
        name: str = "upstream",
        key_header: str = "Authorization",  # "Authorization" sends "Bearer KEY"; others the raw key
        timeout: float = 10.0,
    ) -> None:
        self.name = name
        self._api_base = api_base.rstrip("/")
        self._api_key = api_key
        self._key_header = key_header
        self._timeout = timeout

    def __repr__(self) -> str:
        return f"UpstreamBackend(name={self.name!r}, api_base={self._api_base!r})"

    @property
    def api_base(self) -> str:
        return self._api_base

    @property
    def base_url(self) -> str:
        root = self._api_base
        return root[: -len("/v1")] if root.endswith("/v1") else root

    def auth_headers(self) -> dict[str, str]:
        if not self._api_key:
            return {}
        if self._key_header.lower() == "authorization":
            return {"Authorization": f"Bearer {self._api_key}"}
        return {self._key_header: self._api_key}

    def start(self) -> None:
        """Nothing to run: the server is someone else's."""

    def stop(self, grace: float = 10.0) -> None:
        """Nothing to stop."""

    def health(self, timeout: float | None = None) -> bool:
        try:
            self.models(timeout)
        except BackendUnavailable:
            return False
        return True

    def wait_ready(
        self,
        timeout: float,
        progress: ProgressCallback | None = None,
        cancel: threading.Event | None = None,
        interval: float = 1.0,
    ) -> None:
        started = time.monotonic()
        while not self.health():
            elapsed = time.monotonic() - started
            if cancel is not None and cancel.is_set():
                raise BackendStopped(f"{self.name}: wait cancelled")
            if elapsed >= timeout:
                raise BackendTimeout(f"{self.name}: {self._api_base}/models did not answer")
            if progress is not None:
                progress(elapsed, f"waiting for {self._api_base}")
            time.sleep(interval)

    def models(self, timeout: float | None = None) -> list[dict[str, Any]]:
        return fetch_models(self._api_base, self.auth_headers(), timeout or self._timeout)

    def metrics(self) -> BackendMetrics:
        """Remote servers rarely expose /metrics to clients: the gateway meters them itself."""
        return BackendMetrics(scraped_at=time.monotonic())

    def scrape(self) -> BackendMetrics:
        """Scrape {base_url}/metrics when the upstream is a vLLM that exposes it."""
        return parse_metrics(http_get(self.base_url + "/metrics", timeout=self._timeout).text)
