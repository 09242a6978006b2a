"""The backend's own figures for `appliance status`: vLLM's /metrics, and a generation rate.

vLLM exports generated tokens as a counter, not a rate. The rate here is the counter's change
since the previous status call's scrape, kept in <run>/status-scrape.json (no wait at all: the
cheap way, and `--watch` gets a rate every interval), when that scrape is recent and of the same
backend; otherwise, only while requests are running, the change over a second scrape
SAMPLE_S later. Idle with no recent scrape: no rate (None, with the reason), never a made-up 0.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from inference.backends.base import BackendMetrics, BackendUnavailable, http_get, parse_metrics

SCRAPE_TIMEOUT_S = 0.5
SAMPLE_S = 1.0  # the second scrape's distance, only while requests are running
MIN_WINDOW_S = 0.25  # a previous scrape younger than this is too close to measure over
MAX_WINDOW_S = 60.0  # ... older than this would average over minutes: sample instead
SCRAPE_FILE = "status-scrape.json"


def scrape(endpoint: str) -> BackendMetrics | None:
    """One scrape of <endpoint>/metrics, stamped with wall-clock time (it outlives the process)."""
    try:
        text = http_get(endpoint + "/metrics", timeout=SCRAPE_TIMEOUT_S).text
    except BackendUnavailable:
        return None
    try:
        return parse_metrics(text, scraped_at=time.time())
    except ValueError:  # not Prometheus text: something else answers on the backend's port
        return None


def _previous(path: Path, identity: dict[str, Any], now: float) -> tuple[float, float] | None:
    """(scraped_at, generation_tokens) of the last status call's scrape, when it is usable."""
    try:
        data = json.loads(path.read_text())
        at, tokens = float(data["scraped_at"]), float(data["generation_tokens"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # none yet, unreadable (another user's run dir) or damaged: sample instead
    if not math.isfinite(at) or not math.isfinite(tokens) or tokens < 0:
        return None
    if data.get("backend") != identity or not MIN_WINDOW_S <= now - at <= MAX_WINDOW_S:
        return None
    return at, tokens


def _remember(path: Path, identity: dict[str, Any], metrics: BackendMetrics) -> None:
    """Keep this scrape for the next status call; best effort (a read-only view still works)."""
    if metrics.generation_tokens is None or not path.parent.is_dir():
        return  # no run dir: nothing supervised here, and status never creates state
    record = {
        "backend": identity,
        "scraped_at": metrics.scraped_at,
        "generation_tokens": metrics.generation_tokens,
    }
    # A unique temp file, then a rename: concurrent status calls (threads too) never mix bytes.
    with contextlib.suppress(OSError):  # e.g. another user's run dir
        with tempfile.NamedTemporaryFile(
            "w", dir=path.parent, prefix=f".{path.name}.", delete=False
        ) as tmp:
            tmp.write(json.dumps(record))
        try:
            os.chmod(tmp.name, 0o644)  # like services.json: a non-root status may read it
            os.replace(tmp.name, path)
        except OSError:
            os.unlink(tmp.name)
            raise


def _rate(
    value: float | None, window: float | None, method: str | None, why: str | None
) -> dict[str, Any]:
    if value is not None and not math.isfinite(value):  # a +Inf/NaN counter: no honest rate
        value, window, method, why = None, None, None, "the counter is not a finite number"
    return {
        "tokens_per_s": None if value is None else round(value, 2),
        "window_s": None if window is None else round(window, 2),
        "method": method,  # "previous_status" | "two_scrapes" | None
        "reason": why,  # why there is no rate, when there is none
    }


def generation_rate(
    metrics: BackendMetrics, endpoint: str, run_dir: Path, pid: int | None
) -> dict[str, Any]:
    """Generated tokens/s, and over which window and how it was measured."""
    if metrics.generation_tokens is None:
        return _rate(None, None, None, "not exported by the backend")
    path = run_dir / SCRAPE_FILE
    identity = {"endpoint": endpoint, "pid": pid}  # another backend's counter is not comparable
    earlier = _previous(path, identity, metrics.scraped_at)
    if earlier is not None:
        at, tokens = earlier
        value = metrics.generation_rate(BackendMetrics(generation_tokens=tokens, scraped_at=at))
        _remember(path, identity, metrics)
        return _rate(value, metrics.scraped_at - at, "previous_status", None)
    if not metrics.requests_running:  # 0, or not exported: idle, nothing to sample over
        _remember(path, identity, metrics)
        why = "no requests running" if metrics.requests_running == 0 else "running not exported"
        return _rate(None, None, None, why)
    time.sleep(SAMPLE_S)
    later = scrape(endpoint)
    if later is None or later.generation_tokens is None:
        return _rate(None, None, None, "the second scrape failed")
    _remember(path, identity, later)
    return _rate(
        later.generation_rate(metrics), later.scraped_at - metrics.scraped_at, "two_scrapes", None
    )


def backend_metrics(endpoint: str, run_dir: Path, pid: int | None) -> dict[str, Any] | None:
    """vLLM's figures as status shows them; None when /metrics does not answer."""
    metrics = scrape(endpoint)
    if metrics is None:
        return None
    return {
        "requests_running": metrics.requests_running,
        "requests_waiting": metrics.requests_waiting,
        "kv_cache_usage": metrics.kv_cache_usage,
        "prompt_tokens_total": metrics.prompt_tokens,
        "generation_tokens_total": metrics.generation_tokens,
        "ttft_mean_s": metrics.ttft_mean,
        "generation_rate": generation_rate(metrics, endpoint, run_dir, pid),
    }
