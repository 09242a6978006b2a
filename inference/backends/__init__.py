"""Inference backends behind one interface: vLLM (a process), any process, an upstream server."""

from inference.backends.base import (
    Backend,
    BackendError,
    BackendMetrics,
    BackendStartError,
    BackendState,
    BackendStopped,
    BackendTimeout,
    BackendUnavailable,
    parse_metrics,
)
from inference.backends.process import ProcessBackend
from inference.backends.supervisor import Backoff, Supervisor
from inference.backends.upstream import UpstreamBackend
from inference.backends.vllm import VllmBackend

__all__ = [
    "Backend",
    "BackendError",
    "BackendMetrics",
    "BackendStartError",
    "BackendState",
    "BackendStopped",
    "BackendTimeout",
    "BackendUnavailable",
    "Backoff",
    "ProcessBackend",
    "Supervisor",
    "UpstreamBackend",
    "VllmBackend",
    "parse_metrics",
]
