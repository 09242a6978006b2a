"""Network presets: named sets of allow rules a blueprint can ask for instead of spelling hosts.

HTTPS goes through CONNECT, which the proxy sees only as host:port, so the presets are host and
port rules; `inference.local` is the one plain-HTTP host (the proxy routes it to the gateway with
the sandbox's key, hence `allow_private`).
"""

from __future__ import annotations

from sandbox.policy import Endpoint

PRESETS: dict[str, tuple[Endpoint, ...]] = {
    "inference-only": (
        Endpoint(host="inference.local", ports=[80, 443], access="full", allow_private=True),
    ),
    "npm": (Endpoint(host="registry.npmjs.org", ports=[443]),),
    "pypi": (
        Endpoint(host="pypi.org", ports=[443]),
        Endpoint(host="files.pythonhosted.org", ports=[443]),
    ),
    "github": (
        Endpoint(host="github.com", ports=[443]),
        Endpoint(host="api.github.com", ports=[443]),
        Endpoint(host="codeload.github.com", ports=[443]),
        Endpoint(host="objects.githubusercontent.com", ports=[443]),
        Endpoint(host="raw.githubusercontent.com", ports=[443]),
    ),
    "huggingface": (
        Endpoint(host="huggingface.co", ports=[443]),
        Endpoint(host="*.hf.co", ports=[443]),
    ),
}


def preset_endpoints(names: list[str]) -> list[Endpoint]:
    return [endpoint for name in names for endpoint in PRESETS[name]]
