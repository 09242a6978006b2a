"""What `appliance status` reports, as data: one function per section, cheap enough for --watch.

Later subsystems add their sections to SECTIONS; each takes the config and the host snapshot.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Any

from appliance import __version__
from appliance.config import ApplianceConfig, config_files
from appliance.store.db import DB_NAME, open_store
from hardware.snapshot import HostSnapshot

Section = Callable[[ApplianceConfig, HostSnapshot], dict[str, Any]]


def is_listening(host: str, port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def appliance_section(config: ApplianceConfig, host: HostSnapshot) -> dict[str, Any]:
    return {
        "version": __version__,
        "state_dir": str(config.state_dir),
        "initialised": (config.state_dir / DB_NAME).is_file(),
        "config_files": [str(p) for p in config_files() if p.is_file()],
    }


def host_section(config: ApplianceConfig, host: HostSnapshot) -> dict[str, Any]:
    return host.model_dump(mode="json", exclude={"gpus"})


def gpus_section(config: ApplianceConfig, host: HostSnapshot) -> dict[str, Any]:
    return {"count": len(host.gpus), "devices": [g.model_dump(mode="json") for g in host.gpus]}


def _service(config: ApplianceConfig, name: str) -> dict[str, Any]:
    """The supervisor's view of one service, or an empty dict when no supervisor runs."""
    from appliance.services import read_services, supervisor_pid

    if supervisor_pid(config) is None:
        return {}
    return read_services(config).get(name, {})


def _backend_metrics(base_url: str) -> dict[str, Any] | None:
    from inference.backends.base import BackendUnavailable, http_get, parse_metrics

    try:
        metrics = parse_metrics(http_get(base_url + "/metrics", timeout=0.5).text)
    except BackendUnavailable:
        return None
    return {
        "requests_running": metrics.requests_running,
        "requests_waiting": metrics.requests_waiting,
        "kv_cache_usage": metrics.kv_cache_usage,
        "prompt_tokens_total": metrics.prompt_tokens,
        "generation_tokens_total": metrics.generation_tokens,
        "ttft_mean_s": metrics.ttft_mean,
    }


def inference_section(config: ApplianceConfig, host: HostSnapshot) -> dict[str, Any]:
    listen = config.inference.backend_listen
    endpoint = f"http://{listen.host}:{listen.port}"
    service = _service(config, "backend")
    listening = is_listening(listen.host, listen.port)
    section: dict[str, Any] = {
        "endpoint": endpoint,
        "state": service.get("state") or ("listening" if listening else "down"),
        "detail": service.get("detail"),
        "pid": service.get("pid"),
        "metrics": _backend_metrics(endpoint) if listening else None,
        "plan": None,
    }
    if (config.state_dir / DB_NAME).is_file():
        with open_store(config.state_dir) as store:
            latest = store.latest_plan()
        if latest:
            plan = latest["plan"]
            section["plan"] = {
                "recorded_at": latest["recorded_at"],
                **{k: plan.get(k) for k in ("backend", "variant", "model", "served_model_name")},
            }
    return section


def gateway_section(config: ApplianceConfig, host: HostSnapshot) -> dict[str, Any]:
    gw = config.gateway
    service = _service(config, "gateway")
    listening = is_listening(gw.host, gw.port)
    return {
        "url": f"http://{gw.host}:{gw.port}/v1",
        "state": service.get("state") or ("listening" if listening else "down"),
        "pid": service.get("pid"),
    }


def budgets_section(config: ApplianceConfig, host: HostSnapshot) -> dict[str, Any]:
    """Per-key spend and budget state, and what the gateway served over the last minute."""
    if not (config.state_dir / DB_NAME).is_file():
        return {"keys": [], "throughput": None}
    from appliance.store.inference_store import InferenceStore
    from appliance.usage import budget_report, throughput

    with InferenceStore(config.state_dir) as store:
        return {"keys": budget_report(store), "throughput": throughput(store)}


SECTIONS: dict[str, Section] = {
    "appliance": appliance_section,
    "host": host_section,
    "gpus": gpus_section,
    "inference": inference_section,
    "gateway": gateway_section,
    "budgets": budgets_section,
}


def gather(config: ApplianceConfig, host: HostSnapshot | None = None) -> dict[str, Any]:
    if host is None:
        from hardware.telemetry import collect

        host = collect()
    report: dict[str, Any] = {"taken_at": round(time.time(), 3)}
    for name, section in SECTIONS.items():
        report[name] = section(config, host)
    return report
