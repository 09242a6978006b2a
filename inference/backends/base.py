"""The backend interface, its errors, and vLLM's metrics parsed from Prometheus text."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol

import httpx
from prometheus_client.parser import text_string_to_metric_families

from hardware.secret_names import is_secret_flag

BackendState = Literal["starting", "ready", "restarting", "failed", "stopped"]
ProgressCallback = Callable[[float, str], None]  # (seconds since start, last log line)
StateCallback = Callable[[BackendState, str], None]  # (new state, why)


class BackendError(RuntimeError):
    """A backend could not do what was asked."""


class BackendStartError(BackendError):
    """The backend did not become ready. `retryable` is False when retrying cannot help."""

    def __init__(
        self,
        message: str,
        *,
        log_tail: str = "",
        returncode: int | None = None,
        retryable: bool = True,
    ) -> None:
        super().__init__(message)
        self.log_tail = log_tail
        self.returncode = returncode
        self.retryable = retryable


class BackendTimeout(BackendStartError):
    """Still not healthy when the start timeout ran out."""


class BackendStopped(BackendError):
    """A start was cancelled (the supervisor is stopping)."""


class BackendUnavailable(BackendError):
    """An HTTP call to the backend failed (connection refused, timeout, non-2xx)."""


class Backend(Protocol):
    """One inference server the gateway can send OpenAI requests to."""

    name: str

    @property
    def base_url(self) -> str:
        """The server root, e.g. http://127.0.0.1:8000 (where /health and /metrics live)."""
        ...

    @property
    def api_base(self) -> str:
        """The OpenAI API root the gateway appends /chat/completions etc. to."""
        ...

    def auth_headers(self) -> dict[str, str]:
        """Headers that authenticate the gateway to this backend (never logged)."""
        ...

    def start(self) -> None: ...

    def wait_ready(
        self,
        timeout: float,
        progress: ProgressCallback | None = None,
        cancel: threading.Event | None = None,
    ) -> None: ...

    def health(self) -> bool: ...

    def stop(self, grace: float = 10.0) -> None: ...

    def models(self) -> list[dict[str, Any]]: ...

    def metrics(self) -> BackendMetrics: ...


# --------------------------------------------------------------------------------------------
# Secrets never go in argv: /proc/<pid>/cmdline is readable by every local user.
# --------------------------------------------------------------------------------------------


def secret_flags(argv: Sequence[str]) -> list[str]:
    """The flags in argv that would carry a secret (`--api-key`, `--hf-token`, ...): the one rule
    of hardware/secret_names.py, which the planner's extra_args filter also applies."""
    return [arg.split("=", 1)[0].lower() for arg in argv if is_secret_flag(arg)]


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BackendMetrics:
    """One scrape of a backend's /metrics, summed over label sets. None: not exported."""

    requests_running: float | None = None
    requests_waiting: float | None = None
    kv_cache_usage: float | None = None  # 0..1
    prompt_tokens: float | None = None  # counters, since the backend started
    generation_tokens: float | None = None
    requests_finished: float | None = None
    finished_reasons: dict[str, float] = field(default_factory=dict)
    preemptions: float | None = None
    ttft_sum: float | None = None  # seconds
    ttft_count: float | None = None
    e2e_sum: float | None = None
    e2e_count: float | None = None
    scraped_at: float = 0.0  # time.monotonic() of the scrape

    @property
    def ttft_mean(self) -> float | None:
        return _mean(self.ttft_sum, self.ttft_count)

    @property
    def e2e_mean(self) -> float | None:
        return _mean(self.e2e_sum, self.e2e_count)

    def generation_rate(self, earlier: BackendMetrics) -> float | None:
        """Generated tokens per second between an earlier scrape and this one."""
        dt = self.scraped_at - earlier.scraped_at
        if self.generation_tokens is None or earlier.generation_tokens is None or dt <= 0:
            return None
        # A smaller counter means the backend restarted: count from zero.
        delta = self.generation_tokens - earlier.generation_tokens
        return (delta if delta >= 0 else self.generation_tokens) / dt

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(ttft_mean=self.ttft_mean, e2e_mean=self.e2e_mean)
        return data


def _mean(total: float | None, count: float | None) -> float | None:
    return total / count if total is not None and count else None


# sample name -> field; older vLLM names second (gpu_cache_usage_perc before 0.10)
_SAMPLES: dict[str, str] = {
    "vllm:num_requests_running": "requests_running",
    "vllm:num_requests_waiting": "requests_waiting",
    "vllm:kv_cache_usage_perc": "kv_cache_usage",
    "vllm:gpu_cache_usage_perc": "kv_cache_usage",
    "vllm:prompt_tokens_total": "prompt_tokens",
    "vllm:generation_tokens_total": "generation_tokens",
    "vllm:request_success_total": "requests_finished",
    "vllm:num_preemptions_total": "preemptions",
    "vllm:time_to_first_token_seconds_sum": "ttft_sum",
    "vllm:time_to_first_token_seconds_count": "ttft_count",
    "vllm:e2e_request_latency_seconds_sum": "e2e_sum",
    "vllm:e2e_request_latency_seconds_count": "e2e_count",
}


def parse_metrics(text: str, scraped_at: float | None = None) -> BackendMetrics:
    """vLLM's Prometheus text -> BackendMetrics (sums over model_name/engine label sets)."""
    raw: dict[str, float] = {}
    reasons: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name not in _SAMPLES or math.isnan(sample.value):
                continue
            raw[sample.name] = raw.get(sample.name, 0.0) + sample.value
            if sample.name == "vllm:request_success_total":
                reason = sample.labels.get("finished_reason", "")
                reasons[reason] = reasons.get(reason, 0.0) + sample.value
    if "vllm:kv_cache_usage_perc" in raw:
        raw.pop("vllm:gpu_cache_usage_perc", None)  # the current name wins over the legacy one
    values = {_SAMPLES[name]: value for name, value in raw.items()}
    stamp = time.monotonic() if scraped_at is None else scraped_at
    return BackendMetrics(**values, finished_reasons=reasons, scraped_at=stamp)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# HTTP helpers shared by the backends (a fresh short-lived client: loopback, rare calls)
# --------------------------------------------------------------------------------------------


def http_get(
    url: str, headers: dict[str, str] | None = None, timeout: float = 5.0
) -> httpx.Response:
    try:
        response = httpx.get(url, headers=headers, timeout=timeout)
    except httpx.HTTPError as exc:
        raise BackendUnavailable(f"GET {url}: {type(exc).__name__}: {exc}") from None
    if response.status_code >= 400:
        raise BackendUnavailable(f"GET {url}: HTTP {response.status_code}")
    return response


def fetch_models(
    api_base: str, headers: dict[str, str], timeout: float = 5.0
) -> list[dict[str, Any]]:
    data = http_get(f"{api_base}/models", headers, timeout).json()
    models = data.get("data") if isinstance(data, dict) else None
    if not isinstance(models, list):
        raise BackendUnavailable(f"GET {api_base}/models: no model list in the answer")
    return models
