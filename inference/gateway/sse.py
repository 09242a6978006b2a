"""Metering a server-sent event stream as it passes through, without buffering it.

Each network read is split into whole events; events go out as soon as they are complete (a
partial event is useless to the client anyway). Usage comes from the backend's final usage chunk,
which the gateway always asks for; when the client did not ask, that chunk is dropped so the client
sees exactly the stream it requested. A backend's error event is re-typed as OpenAI's. Each event's
generated text is counted in UTF-8 bytes (a cut stream's bound); cheap byte checks keep plain
token events on a path that only parses them.
"""

from __future__ import annotations

import json
import time
from typing import Any

from inference.gateway.errors import backend_error


class SSEMeter:
    def __init__(self, client_wants_usage: bool, chat: bool) -> None:
        self.client_wants_usage = client_wants_usage
        self.chat = chat
        self.usage: dict[str, Any] | None = None
        self.data_events = 0  # content events served
        # UTF-8 bytes of the generated text served (content, reasoning, tool calls, text): with
        # data_events, a bound on the tokens of a stream cut before its usage chunk.
        self.text_bytes = 0
        self.first_token_at: float | None = None
        self.done = False  # saw [DONE]
        self._buf = b""
        self._sep = b"\n\n"

    def feed(self, chunk: bytes) -> bytes:
        """Whole events from this read (and any carried-over part), ready to send on."""
        buf = self._buf + chunk if self._buf else chunk
        if self._sep == b"\n\n" and b"\r\n" in buf:
            self._sep = b"\r\n\r\n"  # some servers delimit with CRLF
        end = buf.rfind(self._sep)
        if end < 0:
            self._buf = buf
            return b""
        end += len(self._sep)
        self._buf = buf[end:]
        complete = buf[:end]
        if b'"usage"' not in complete and b"[DONE]" not in complete and b'"error"' not in complete:
            # Fast path: plain token events, forwarded as they are.
            n = complete.count(b"data:")
            if n:
                self._count(n, complete)
                self.text_bytes += sum(
                    generated_bytes(_data_json(ev)) for ev in complete.split(self._sep) if ev
                )
            return complete
        out = [self._event(ev) for ev in complete.split(self._sep) if ev]
        return b"".join(e + self._sep for e in out if e is not None)

    def tail(self) -> bytes:
        """Whatever partial event the stream ended on (sent as is)."""
        rest, self._buf = self._buf, b""
        return rest

    def _count(self, n: int, events: bytes) -> None:
        if self.data_events == 0 and self.chat and b'"role"' in events:
            n -= 1  # the first chat chunk carries only the role
        if n > 0:
            if self.first_token_at is None:
                self.first_token_at = time.perf_counter()
            self.data_events += n

    def _event(self, event: bytes) -> bytes | None:
        if b"[DONE]" in event and event.strip().endswith(b"[DONE]"):
            self.done = True
            return event
        data = _data_json(event)
        if b'"error"' in event:
            retyped = _retyped_error(data)
            if retyped is not None:
                return retyped
        usage = data.get("usage") if isinstance(data, dict) else None
        if not isinstance(usage, dict):
            if b"data:" in event:
                self._count(1, event)
                self.text_bytes += generated_bytes(data)
            return event
        self.usage = usage
        if self.client_wants_usage:
            return event
        if not data.get("choices"):
            return None  # the usage-only chunk the client did not ask for
        # Usage riding on a content chunk (continuous usage stats): strip it, keep the content.
        self._count(1, event)
        self.text_bytes += generated_bytes(data)
        data.pop("usage", None)
        return b"data: " + json.dumps(data, separators=(",", ":")).encode()


def generated_bytes(data: Any) -> int:
    """UTF-8 bytes of every string a chunk's choices carry but the role (an upper bound on the
    generated text in it: ids and type names of tool calls count too)."""
    if not isinstance(data, dict) or not isinstance(data.get("choices"), list):
        return 0
    total = 0
    for choice in data["choices"]:
        if isinstance(choice, dict):
            total += _string_bytes(choice.get("text")) + _string_bytes(choice.get("delta"))
    return total


def _string_bytes(node: Any) -> int:
    if isinstance(node, str):
        return len(node.encode("utf-8", "surrogatepass"))
    if isinstance(node, dict):
        return sum(_string_bytes(v) for k, v in node.items() if k != "role")
    if isinstance(node, list):
        return sum(_string_bytes(v) for v in node)
    return 0


def _retyped_error(data: Any) -> bytes | None:
    """A backend's error event (vLLM: `"type": "BadRequestError"`), parsed, in OpenAI's error
    shape and types; None when the event is not one."""
    error = data.get("error") if isinstance(data, dict) else None
    if not isinstance(error, dict):
        return None
    status = error.get("code") if isinstance(error.get("code"), int) else 500
    _, body = backend_error(status if 400 <= status <= 599 else 500, json.dumps(data).encode())
    return b"data: " + body


def _data_json(event: bytes) -> Any:
    lines = [ln[5:].lstrip() for ln in event.splitlines() if ln.startswith(b"data:")]
    try:
        return json.loads(b"\n".join(lines))
    except ValueError:
        return None
