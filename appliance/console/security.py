"""Browser-facing hardening for every answer of the control plane's port: the headers below
(pages, fragments, static assets and the API's JSON alike), and a same-origin check of the
console's form posts (a second lock after the CSRF token: a browser names the page a POST came
from in Origin).

The CSP allows no inline script or style at all (templates use none: the one script and the one
stylesheet are files under /static), nothing from another origin, no framing, and forms that post
only here. `Referrer-Policy: same-origin`, not no-referrer: under no-referrer a browser sends
`Origin: null` with every form POST (Fetch standard), which the origin check refuses (found by the
real-browser test: the login failed). A one-tap page (/one-tap/<token>, no session and no origin
check) keeps no-referrer: its token never leaves in a Referer, not even to this host.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

CSP = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "form-action 'self'",
        "frame-ancestors 'none'",
        "base-uri 'none'",
    ]
)

HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "same-origin",
    "cross-origin-opener-policy": "same-origin",
    "cross-origin-resource-policy": "same-origin",
    "permissions-policy": "camera=(), microphone=(), geolocation=(), payment=(), usb=()",
}
HSTS = "max-age=31536000"  # only over https (a reverse proxy in front), never plain loopback


class SecurityHeaders:
    """Pure ASGI (no BaseHTTPMiddleware: streamed answers, the API's turns, pass untouched)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        static = scope["path"].startswith("/static/")
        one_tap = scope["path"].startswith("/one-tap/")
        https = scope.get("scheme") == "https"

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                if one_tap:
                    headers.setdefault("referrer-policy", "no-referrer")
                for name, value in HEADERS.items():
                    headers.setdefault(name, value)
                if not static:  # pages show live state and a CSRF token: never from a cache
                    headers.setdefault("cache-control", "no-store")
                if https:
                    headers.setdefault("strict-transport-security", HSTS)
            await send(message)

        await self.app(scope, receive, with_headers)


def origin_of(url: str) -> str:
    """`https://console.example.com/x` -> `https://console.example.com` (as a browser's Origin)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


def same_origin(origin: str | None, host: str | None) -> bool:
    """A POST's Origin names this host (or is absent: a browser without it, or not a browser;
    the CSRF token still has to match). `Origin: null` (a sandboxed frame, a file) is refused."""
    if origin is None:
        return True
    scheme, _, rest = origin.partition("://")
    return scheme in ("http", "https") and bool(host) and rest.lower() == (host or "").lower()
