"""Notices a backend gives about how it served a request: the one response header that carries
them, shared by the embedded server (which sets it), the gateway (which relays it from the local
backend) and the control plane (which words the same facts for an agent's turn)."""

from __future__ import annotations

import re

NOTICE_HEADER = "x-appliance-notice"
_MAX_LEN = 300
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")  # header values must be latin-1 and one line


def tools_ignored(model: str) -> str:
    """The notice for a request whose `tools` the model's chat template cannot show it."""
    return f"tools ignored: {model}'s chat template has no tool slot"


def header_value(text: str) -> str:
    """`text` as a safe header value: printable ASCII on one line (anything else becomes `?`),
    at most 300 characters."""
    return _UNPRINTABLE.sub("?", text)[:_MAX_LEN]
