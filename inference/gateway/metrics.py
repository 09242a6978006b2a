"""Prometheus metrics of the gateway, in a registry of its own (one per app, so tests and two
gateways in one process never collide). The `key` label is the key's id (`key_3f9a...`), never
its human name: the names are in one info gauge, appliance_key_info, for dashboards to join on.
The host's GPUs are read at scrape time (collectors.py). GET /metrics needs a key with the
`metrics` scope."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from inference.gateway.collectors import GpuCollector, KeyInfoCollector, TelemetrySource
from inference.ports import KeyStore

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

BACKEND_STATE = {"down": 0, "up": 1}


class GatewayMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(
        self, keys: KeyStore | None = None, telemetry: TelemetrySource | None = None
    ) -> None:
        """`keys`: the store whose keys appliance_key_info names (None: no info gauge);
        `telemetry`: the GPU snapshot source (None: this host's, hardware.telemetry.collect)."""
        self.registry = r = CollectorRegistry(auto_describe=True)
        r.register(GpuCollector(telemetry))
        if keys is not None:
            r.register(KeyInfoCollector(keys))
        p = "appliance_gateway_"
        self.requests = Counter(
            p + "requests", "Requests answered", ["route", "status", "key", "model"], registry=r
        )
        self.errors = Counter(p + "errors", "Requests that failed", ["route", "type"], registry=r)
        self.in_flight = Gauge(p + "requests_in_flight", "Requests being served", registry=r)
        self.latency = Histogram(
            p + "request_seconds",
            "Request latency, to the last byte",
            ["route", "model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            p + "time_to_first_token_seconds",
            "Time to the first streamed token",
            ["model"],
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            p + "prompt_tokens", "Prompt tokens metered", ["key", "model"], registry=r
        )
        self.completion_tokens = Counter(
            p + "completion_tokens", "Completion tokens metered", ["key", "model"], registry=r
        )
        self.cost = Counter(p + "cost", "Cost metered (price table)", ["key", "model"], registry=r)
        self.backend_up = Gauge(
            p + "backend_up", "1 when the backend answered its last call", ["backend"], registry=r
        )
        self.budget_state = Gauge(
            p + "budget_state",
            "0 ok, 1 warning (>= warn ratio), 2 daily limit reached, 3 monthly cap (stopped)",
            ["key"],
            registry=r,
        )
        self.budget_warnings = Counter(
            p + "budget_warnings",
            "Budget warnings raised (once per period)",
            ["key", "budget"],
            registry=r,
        )
        self.budget_refusals = Counter(
            p + "budget_refusals", "Requests refused by a budget", ["key", "budget"], registry=r
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
