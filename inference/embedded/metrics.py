"""Prometheus metrics under vLLM's names and labels, so one scraper reads vLLM and us alike."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

if TYPE_CHECKING:
    from inference.embedded.engine import Engine
    from inference.embedded.request import Request

# vLLM's buckets (vllm/v1/metrics/loggers.py), so dashboards built for vLLM read ours too.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
               10.0, 20.0, 40.0, 80.0)  # fmt: skip
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
               120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip


class VllmMetrics:
    """Registers the metrics in its own registry and listens to the engine (EngineListener)."""

    def __init__(self, engine: Engine, model_name: str, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        labels = {"model_name": model_name, "engine": "0"}
        names = list(labels)

        def gauge(name: str, doc: str, fn: object) -> None:
            Gauge(name, doc, names, registry=self.registry).labels(**labels).set_function(fn)

        gauge(
            "vllm:num_requests_running", "Requests in model execution batches.", engine.num_running
        )
        gauge("vllm:num_requests_waiting", "Requests waiting to be processed.", engine.num_waiting)
        gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
              engine.kv_cache_usage)  # fmt: skip

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, names, registry=self.registry).labels(**labels)

        self.prompt_tokens = counter("vllm:prompt_tokens", "Number of prefill tokens processed.")
        self.generation_tokens = counter(
            "vllm:generation_tokens", "Number of generation tokens processed."
        )
        counter("vllm:num_preemptions", "Cumulative number of preemptions.")  # never: no paging
        # vLLM v1's prefix-cache counters, in tokens (hit rate = hits / queries).
        self.prefix_cache_queries = counter(
            "vllm:prefix_cache_queries",
            "Prefix cache queries, in terms of number of queried tokens.",
        )
        self.prefix_cache_hits = counter(
            "vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens."
        )
        self._prefix_caching = getattr(engine, "prefix_cache", None) is not None
        self._success = Counter(
            "vllm:request_success",
            "Count of successfully processed requests.",
            [*names, "finished_reason"],
            registry=self.registry,
        )
        for reason in ("stop", "length", "abort"):  # present at 0, as vLLM does
            self._success.labels(**labels, finished_reason=reason)
        self._labels = labels

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            h = Histogram(name, doc, names, buckets=buckets, registry=self.registry)
            return h.labels(**labels)

        self.ttft = histogram(
            "vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
            TTFT_BUCKETS,
        )  # fmt: skip
        self.itl = histogram(
            "vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
            ITL_BUCKETS,
        )  # fmt: skip
        self.e2e = histogram(
            "vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
            E2E_BUCKETS,
        )  # fmt: skip
        self.queue_time = histogram(
            "vllm:request_queue_time_seconds",
            "Histogram of time spent in WAITING phase for request.",
            E2E_BUCKETS,
        )
        engine.listeners.append(self)

    # -- EngineListener ------------------------------------------------------------------------
    def on_prompt(self, req: Request) -> None:
        self.prompt_tokens.inc(len(req.prompt_ids))
        if self._prefix_caching:
            self.prefix_cache_queries.inc(len(req.prompt_ids))
            self.prefix_cache_hits.inc(req.cached_tokens)
        if req.admitted is not None:
            self.queue_time.observe(req.admitted - req.arrival)

    def on_token(self, req: Request, now: float) -> None:
        self.generation_tokens.inc()
        if req.last_token is None:
            self.ttft.observe(now - req.arrival)
        else:
            self.itl.observe(now - req.last_token)

    def on_finish(self, req: Request, now: float) -> None:
        if req.finish_reason in ("stop", "length", "abort"):  # not "error": that is no success
            self._success.labels(**self._labels, finished_reason=req.finish_reason).inc()
        self.e2e.observe(now - req.arrival)
