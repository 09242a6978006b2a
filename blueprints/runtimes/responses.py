"""The part of OpenResponses (`POST /v1/responses`, streamed as server-sent events) that drives a
turn of a long-lived agent runtime: OpenClaw's gateway speaks it, and so can any `kind: command`
runtime with `serve:` (tests/fixtures/responses_server.py is the smallest one).

The runtime is the agent's own process, inside its sandbox: what it answers is untrusted. Every
failure (not ready, refused token, an HTTP error, a stream that is not one, a connection that
drops) becomes a `Finished(ok=False, error=<one line>)`, never an exception, so the turn's record
is kept; lines, replies and bodies are bounded. Closing the generator closes the HTTP stream,
which is how a turn is cancelled in the runtime. TurnStopped, raised by the transport when the
turn is stopped from outside (its client went away), is let through: not retried, not waited out.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx

from blueprints.runtimes import Delta, Finished

RESPONSES_PATH = "/v1/responses"
READY_TIMEOUT_S = 120.0  # OpenClaw's gateway took 16-35 s to be ready on two cores
READY_POLL_S = 0.5
READY_REQUEST_S = 5.0
MAX_LINE_BYTES = 1 << 20  # one SSE line (an event's data)
MAX_REPLY_CHARS = 1 << 20
MAX_BODY_BYTES = 16 << 20  # a JSON answer read whole (an error, a history)
EVENTS_AFTER_END = 16  # read after the last event, so the runtime finishes its reply cleanly
ERROR_CHARS = 300
# A session name as it goes in a header: no `:` (OpenClaw reserves cron:, acp:, subagent:).
SESSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class ProtocolError(Exception):
    """The runtime's answer is not the protocol (one line, says what)."""


def bad_session(session: str) -> str | None:
    """Why `session` cannot name a runtime's session (None: it can)."""
    if SESSION.fullmatch(session):
        return None
    return f"session {one_line(session, 60)!r} is not [A-Za-z0-9][A-Za-z0-9._-]{{0,127}}"


def one_line(text: object, limit: int = ERROR_CHARS) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


# -- reading ------------------------------------------------------------------------------------


def sse_events(chunks: Iterable[bytes]) -> Iterator[tuple[str, str]]:
    """(event, data) per server-sent event; a line over MAX_LINE_BYTES or bytes that are not
    UTF-8 are a ProtocolError."""
    buf = bytearray()
    event, data = "", []
    for chunk in chunks:
        buf += chunk
        start = 0
        while (nl := buf.find(b"\n", start)) >= 0:
            line = bytes(buf[start:nl]).rstrip(b"\r")
            start = nl + 1
            if not line:  # a blank line ends the event
                if data:
                    yield event or "message", "\n".join(data)
                event, data = "", []
                continue
            try:
                text = line.decode()
            except UnicodeDecodeError:
                raise ProtocolError("the runtime's stream is not UTF-8") from None
            name, _, value = text.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "event":
                event = value
            elif name == "data":
                data.append(value)
        del buf[:start]
        if len(buf) > MAX_LINE_BYTES or sum(map(len, data)) > MAX_LINE_BYTES:
            raise ProtocolError(f"an event over {MAX_LINE_BYTES} bytes in the runtime's stream")
    if data:
        yield event or "message", "\n".join(data)


def read_bounded(response: httpx.Response, limit: int = MAX_BODY_BYTES) -> bytes:
    body = bytearray()
    for chunk in response.iter_bytes():
        body += chunk
        if len(body) > limit:
            raise ProtocolError(f"the runtime's answer is over {limit} bytes")
    return bytes(body)


def http_error(response: httpx.Response) -> str:
    """One line for a non-200 answer: its status and the message it gave, if any."""
    try:
        body = read_bounded(response, 64 << 10)
    except (ProtocolError, httpx.HTTPError):
        body = b""
    try:
        payload = json.loads(body)
    except ValueError:
        payload = None
    error = payload.get("error") if isinstance(payload, dict) else None
    message = error.get("message") if isinstance(error, dict) else error
    detail = str(message) if message else body.decode(errors="replace")
    status = f"HTTP {response.status_code}"
    if response.status_code in (401, 403):
        reason = one_line(detail or "no reason")
        return f"the runtime refused the agent's token ({status}: {reason})"
    return f"the runtime answered {status}" + (f": {one_line(detail)}" if detail else "")


def count(value: object) -> int:
    """A token count from the runtime, or 0 (a bool, a string, a negative number are not)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def normalise_usage(usage: object) -> dict[str, int]:
    """OpenResponses usage as the turn record keeps it (OpenClaw's own names): `input` without
    the cached prompt, `cacheRead`, `cacheWrite`, `output`, `total` (summed over the turn's
    model calls by OpenClaw)."""
    usage = usage if isinstance(usage, dict) else {}
    details = usage.get("input_tokens_details")
    details = details if isinstance(details, dict) else {}
    prompt, output = count(usage.get("input_tokens")), count(usage.get("output_tokens"))
    cache_read = count(details.get("cached_tokens"))
    cache_write = count(details.get("cache_write_tokens"))
    return {
        "input": max(0, prompt - cache_read - cache_write),
        "output": output,
        "cacheRead": cache_read,
        "cacheWrite": cache_write,
        "total": count(usage.get("total_tokens")) or prompt + output,
    }


def output_text(response: dict[str, Any]) -> str | None:
    """The reply text of a finished response: its message items' output_text parts."""
    output = response.get("output")
    if not isinstance(output, list):
        return None
    texts = [
        part["text"]
        for item in output
        if isinstance(item, dict) and item.get("type") == "message"
        for part in (item.get("content") if isinstance(item.get("content"), list) else [])
        if isinstance(part, dict) and part.get("type") == "output_text"
        if isinstance(part.get("text"), str)
    ]
    return "".join(texts) if texts else None


# -- one turn -----------------------------------------------------------------------------------


@dataclass
class Result:
    """How a streamed response ended."""

    ok: bool = False
    parts: list[str] = field(default_factory=list)
    text: str | None = None
    usage: dict[str, int] = field(default_factory=dict)
    response_id: str | None = None
    raw: dict[str, Any] | None = None
    error: str | None = None
    ended: bool = False  # a terminal event (completed, incomplete, failed, error) was read

    def fail(self, error: str) -> Result:
        self.ok, self.error = False, error
        return self

    def finished(self, session_id: str | None = None) -> Finished:
        text = self.text if self.text is not None else "".join(self.parts)
        return Finished(
            ok=self.ok,
            text=text,
            usage=self.usage,
            session_id=self.response_id or session_id,
            raw=self.raw,
            error=None if self.ok else (self.error or "the runtime reported a failure"),
        )


def wait_ready(http: httpx.Client, path: str, timeout_s: float = READY_TIMEOUT_S) -> str | None:
    """None once GET `path` answers 200; else, after `timeout_s`, why not (one line). A runtime
    just (re)started refuses connections, or its agent socket drops them, until it listens.
    TurnStopped (not an HTTP error) ends the wait at once."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with http.stream("GET", path, timeout=READY_REQUEST_S) as response:  # body unread
                status = response.status_code
            if status == 200:
                return None
            last = f"{path} answered HTTP {status}"
        except (httpx.HTTPError, OSError) as exc:
            last = one_line(f"{type(exc).__name__}: {exc}")
        left = deadline - time.monotonic()
        if left <= 0:
            return f"the runtime was not ready within {timeout_s:.0f} s ({last})"
        time.sleep(min(READY_POLL_S, left))


def stream_turn(
    http: httpx.Client, token: str, body: dict[str, Any], headers: dict[str, str]
) -> Generator[Delta, None, Result]:
    """POST `body` to /v1/responses with the token and `headers`, yield the reply's deltas as
    they come, return how it ended (`yield from`). Closing the generator closes the stream."""
    result = Result()
    try:
        with http.stream(
            "POST",
            RESPONSES_PATH,
            json=body,
            headers={
                "Authorization": f"Bearer {token}",
                "Accept": "text/event-stream",
                **headers,
            },
        ) as response:
            if response.status_code != 200:
                return result.fail(http_error(response))
            ctype = response.headers.get("content-type", "").split(";")[0].strip()
            if ctype != "text/event-stream":
                return result.fail(f"the runtime answered {ctype or 'no content type'}, "
                                   "not an event stream")  # fmt: skip
            after_end = 0
            for event, data in sse_events(response.iter_bytes()):
                if data.strip() == "[DONE]":
                    break
                if result.ended:  # let the runtime finish its reply, within reason
                    after_end += 1
                    if after_end > EVENTS_AFTER_END:
                        break
                    continue
                if (delta := _apply(result, event, data)) is not None:
                    yield Delta(delta)
    except ProtocolError as exc:  # after its last event, the turn stands as it ended
        return result if result.ended else result.fail(str(exc))
    except (httpx.HTTPError, OSError) as exc:
        reason = one_line(f"{type(exc).__name__}: {exc}")
        return (
            result
            if result.ended
            else result.fail(f"the connection to the runtime failed: {reason}")
        )
    if not result.ended:
        return result.fail("the runtime's stream ended before the response did")
    return result


def _apply(result: Result, event: str, data: str) -> str | None:
    """One event into `result`; the reply text it adds, if any."""
    try:
        payload = json.loads(data)
    except ValueError:
        reason = f"the runtime sent an event that is not JSON: {one_line(data, 80)}"
        raise ProtocolError(reason) from None
    if not isinstance(payload, dict):
        raise ProtocolError("the runtime sent an event that is not a JSON object")
    kind = payload.get("type") if isinstance(payload.get("type"), str) else event
    response = payload.get("response")
    response = response if isinstance(response, dict) else None
    if response is not None and isinstance(response.get("id"), str):
        result.response_id = response["id"][:200]
    if kind == "response.output_text.delta":
        delta = payload.get("delta")
        if not isinstance(delta, str):
            raise ProtocolError("the runtime sent a text delta without text")
        if sum(map(len, result.parts)) + len(delta) > MAX_REPLY_CHARS:
            raise ProtocolError(f"the runtime's reply is over {MAX_REPLY_CHARS} characters")
        result.parts.append(delta)
        return delta
    if kind in ("response.completed", "response.incomplete"):
        if response is None:
            raise ProtocolError(f"the runtime sent {kind} without its response")
        text = output_text(response)
        result.text = text[:MAX_REPLY_CHARS] if text is not None else None
        result.ok, result.ended, result.raw = True, True, response
        result.usage = normalise_usage(response.get("usage"))
    elif kind in ("response.failed", "error"):
        error = (response or {}).get("error") if kind == "response.failed" else payload
        error = error if isinstance(error, dict) else {}
        message = one_line(error.get("message") or "no reason given")
        code = f" ({one_line(error['code'], 60)})" if error.get("code") else ""
        result.fail(f"the runtime failed the turn: {message}{code}")
        result.ended, result.raw = True, response
        if response is not None:
            result.usage = normalise_usage(response.get("usage"))
    return None
