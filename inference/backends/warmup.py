"""The warm-up before `ready`: one tiny completion (max_tokens 1) answered.

vLLM compiles kernels (torch.compile, CUDA graphs) on its first request: minutes for a large
model. A backend is only `ready` once that request was answered, so the first user's request does
not pay for it. The request runs in a thread while the caller keeps checking that the process is
alive, that it was not cancelled and that time is left (`check`), and reports progress.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import httpx

from inference.backends.base import BackendStartError

WARMUP_PROMPT = "Hello"
PROGRESS_LINE = "warming up: the first request (kernels compile on the first one)"


def warmup_body(model: str) -> dict[str, Any]:
    return {"model": model, "prompt": WARMUP_PROMPT, "max_tokens": 1, "temperature": 0}


def warm_up(
    api_base: str,
    model: str,
    headers: dict[str, str],
    *,
    timeout: float,
    check: Callable[[], None],
    report: Callable[[str], None],
    interval: float = 0.25,
) -> None:
    """POST {api_base}/completions for `model`; raise BackendStartError if it is refused.
    `check()` raises to abandon the wait (the process exited, cancelled, out of time)."""
    outcome: dict[str, Any] = {}

    def ask() -> None:
        try:
            outcome["response"] = httpx.post(
                f"{api_base}/completions", json=warmup_body(model), headers=headers, timeout=timeout
            )
        except httpx.HTTPError as exc:
            outcome["error"] = exc

    asker = threading.Thread(target=ask, name="backend-warmup", daemon=True)
    started = time.monotonic()
    asker.start()
    while asker.is_alive():
        check()
        report(f"{PROGRESS_LINE}, {time.monotonic() - started:.0f} s")
        asker.join(interval)
    if "error" in outcome:
        exc = outcome["error"]
        raise BackendStartError(f"warm-up request failed: {type(exc).__name__}: {exc}")
    response: httpx.Response = outcome["response"]
    if response.status_code >= 400:
        # 4xx: our request is wrong (model name, key): starting again cannot fix it.
        raise BackendStartError(
            f"warm-up request refused: HTTP {response.status_code}: {response.text[:200]}",
            retryable=response.status_code >= 500,
        )
