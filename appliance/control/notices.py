"""What an agent's turn record says about the model that answered (`agent run` prints it once).

The local backend says it itself: the embedded server's /v1/models card carries
`"appliance": {"tools": bool | null, "demonstration": bool}` (vLLM's has no such field). So the
control plane asks it on its loopback port, briefly and cached, and loads no model; where it
cannot ask, or the agent's model is not the local one, it says nothing rather than guess.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx

from appliance.config import ApplianceConfig
from inference.notices import header_value, tools_ignored

ASK_TIMEOUT_S = 1.0
CACHE_S = 30.0  # a backend restarted with another model is noticed within this
RETRY_S = 5.0  # after a failed ask

_cache: dict[str, tuple[float, dict[str, Any] | None]] = {}  # url -> (good until, facts)
_lock = threading.Lock()
_asking = threading.Lock()


def demonstration(model: str) -> str:
    return (
        f"reply from {model}, the embedded demonstration model: it cannot follow an agent's "
        "~6K-token prompt, so expect nonsense; for a real model serve one on a GPU host "
        "(`appliance plan`) or send `default` to an upstream (`gateway.upstream`; "
        "README: Quick start)"
    )


def turn_notices(
    config: ApplianceConfig, model: str = "default", *, tools: bool = True
) -> list[str]:
    """One-line notices for a turn of an agent whose blueprint asks for `model` (its
    `inference.model`, a gateway alias): which model answered when it is the embedded
    demonstration model, and, when the runtime sends `tools` (OpenClaw does), that the model
    never saw them because its chat template has no tool slot."""
    if config.inference.backend == "vllm":
        return []
    served = config.inference.served_model_name
    aliases = {"default": served, **config.gateway.aliases}  # as the gateway resolves them
    if aliases.get(model, model) != served:
        return []  # an upstream's (or no) model answers: the local backend is not asked
    facts = backend_facts(config)
    if facts is None:
        return []
    name = facts["model"]
    notices = []
    if facts["demonstration"] is True:
        notices.append(demonstration(name))
    if tools and facts["tools"] is False:
        notices.append(tools_ignored(name))
    return notices


def backend_facts(config: ApplianceConfig) -> dict[str, Any] | None:
    """{"model", "tools", "demonstration"} from the local backend's card for the served model;
    None when it cannot be asked or does not say (vLLM). Cached per backend address."""
    url = backend_url(config)
    # One ask at a time: turns racing on a cold cache wait for the first one's answer instead
    # of each asking (sixteen asks at once could each miss the timeout on a busy machine).
    with _asking:
        now = time.monotonic()
        with _lock:
            hit = _cache.get(url)
        if hit is not None and now < hit[0]:
            return hit[1]
        facts = _ask(url, config.inference.served_model_name)
        with _lock:
            _cache[url] = (now + (CACHE_S if facts is not None else RETRY_S), facts)
        return facts


def backend_url(config: ApplianceConfig) -> str:
    """The backend's /v1/models on its internal listener (a wildcard bind: via loopback)."""
    listen = config.inference.backend_listen
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(listen.host, listen.host)
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{listen.port}/v1/models"


def _ask(url: str, served: str) -> dict[str, Any] | None:
    try:
        response = httpx.get(url, timeout=ASK_TIMEOUT_S)
        cards = response.json().get("data") if response.status_code == 200 else None
    except (httpx.HTTPError, ValueError, AttributeError):
        return None
    for card in cards if isinstance(cards, list) else []:
        if not isinstance(card, dict) or card.get("id") != served:
            continue
        facts = card.get("appliance")
        if not isinstance(facts, dict):
            return None
        root = card.get("root")
        return {  # the name goes to an operator's terminal: one printable line
            "model": header_value(root if isinstance(root, str) and root else served)[:80],
            "tools": facts.get("tools") if isinstance(facts.get("tools"), bool) else None,
            "demonstration": facts.get("demonstration") is True,
        }
    return None
