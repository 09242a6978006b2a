"""Parsing vLLM's /metrics, the restart backoff, and the upstream backend's key handling."""

from __future__ import annotations

import pytest

from inference.backends.base import BackendMetrics, parse_metrics
from inference.backends.supervisor import Backoff
from inference.backends.upstream import UpstreamBackend

# The shape vLLM 0.33 exports (prometheus_client text format), two engines, trimmed buckets.
VLLM_METRICS = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="nemotron"} 3.0
vllm:num_requests_running{engine="1",model_name="nemotron"} 2.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="nemotron"} 1.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="nemotron"} 0.25
# HELP vllm:prompt_tokens_total Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{engine="0",model_name="nemotron"} 1200.0
vllm:prompt_tokens_created{engine="0",model_name="nemotron"} 1.7e+09
# HELP vllm:generation_tokens_total Number of generation tokens processed.
# TYPE vllm:generation_tokens_total counter
vllm:generation_tokens_total{engine="0",model_name="nemotron"} 340.0
vllm:generation_tokens_total{engine="1",model_name="nemotron"} 60.0
# HELP vllm:request_success_total Count of successfully processed requests.
# TYPE vllm:request_success_total counter
vllm:request_success_total{engine="0",finished_reason="stop",model_name="nemotron"} 7.0
vllm:request_success_total{engine="0",finished_reason="length",model_name="nemotron"} 2.0
vllm:request_success_total{engine="0",finished_reason="abort",model_name="nemotron"} 1.0
# HELP vllm:num_preemptions_total Cumulative number of preemption from the engine.
# TYPE vllm:num_preemptions_total counter
vllm:num_preemptions_total{engine="0",model_name="nemotron"} 0.0
# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.5",model_name="nemotron"} 8.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="nemotron"} 10.0
vllm:time_to_first_token_seconds_count{engine="0",model_name="nemotron"} 10.0
vllm:time_to_first_token_seconds_sum{engine="0",model_name="nemotron"} 4.2
# HELP vllm:e2e_request_latency_seconds Histogram of e2e request latency in seconds.
# TYPE vllm:e2e_request_latency_seconds histogram
vllm:e2e_request_latency_seconds_bucket{engine="0",le="+Inf",model_name="nemotron"} 10.0
vllm:e2e_request_latency_seconds_count{engine="0",model_name="nemotron"} 10.0
vllm:e2e_request_latency_seconds_sum{engine="0",model_name="nemotron"} 50.0
# HELP python_gc_objects_collected_total Objects collected during gc
# TYPE python_gc_objects_collected_total counter
python_gc_objects_collected_total{generation="0"} 1234.0
"""


def test_parse_vllm_metrics() -> None:
    m = parse_metrics(VLLM_METRICS, scraped_at=10.0)
    assert m.requests_running == 5.0  # summed over engines
    assert m.requests_waiting == 1.0
    assert m.kv_cache_usage == 0.25
    assert m.prompt_tokens == 1200.0
    assert m.generation_tokens == 400.0
    assert m.requests_finished == 10.0
    assert m.finished_reasons == {"stop": 7.0, "length": 2.0, "abort": 1.0}
    assert m.preemptions == 0.0
    assert m.ttft_count == 10.0 and m.ttft_mean == pytest.approx(0.42)
    assert m.e2e_mean == pytest.approx(5.0)
    assert m.as_dict()["ttft_mean"] == pytest.approx(0.42)


def test_missing_metrics_are_none_not_zero() -> None:
    m = parse_metrics("# nothing here\n")
    assert m.kv_cache_usage is None and m.generation_tokens is None and m.ttft_mean is None


def test_legacy_cache_usage_name() -> None:
    text = '# TYPE vllm:gpu_cache_usage_perc gauge\nvllm:gpu_cache_usage_perc{model_name="m"} 0.5\n'
    assert parse_metrics(text).kv_cache_usage == 0.5
    both = (
        text
        + '# TYPE vllm:kv_cache_usage_perc gauge\nvllm:kv_cache_usage_perc{model_name="m"} 0.1\n'
    )
    assert parse_metrics(both).kv_cache_usage == 0.1


def test_generation_rate() -> None:
    earlier = BackendMetrics(generation_tokens=100.0, scraped_at=1.0)
    later = BackendMetrics(generation_tokens=300.0, scraped_at=3.0)
    assert later.generation_rate(earlier) == 100.0
    restarted = BackendMetrics(generation_tokens=50.0, scraped_at=3.0)
    assert restarted.generation_rate(earlier) == 25.0  # counter reset: count from zero
    assert BackendMetrics(scraped_at=3.0).generation_rate(earlier) is None


def test_backoff_doubles_to_the_cap_and_resets() -> None:
    backoff = Backoff()
    assert [backoff.next() for _ in range(9)] == [1, 2, 4, 8, 16, 32, 60, 60, 60]
    backoff.reset()
    assert backoff.next() == 1


def test_upstream_key_is_a_header_never_in_repr() -> None:
    up = UpstreamBackend("https://integrate.api.nvidia.com/v1/", api_key="nvapi-secret")
    assert up.api_base == "https://integrate.api.nvidia.com/v1"
    assert up.base_url == "https://integrate.api.nvidia.com"
    assert up.auth_headers() == {"Authorization": "Bearer nvapi-secret"}
    assert "nvapi-secret" not in repr(up)
    azure = UpstreamBackend("https://x/v1", api_key="k", key_header="api-key")
    assert azure.auth_headers() == {"api-key": "k"}
    assert UpstreamBackend("http://x/v1").auth_headers() == {}


def test_upstream_unreachable_is_unhealthy() -> None:
    assert UpstreamBackend("http://127.0.0.1:9/v1", timeout=0.5).health() is False
