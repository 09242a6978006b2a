"""The answer's way back: a whole JSON response, or a stream relayed event by event, metered
however it ends (normally, cut by the backend, or the client hanging up).

What is charged never undercounts: the backend's usage when it sent a well-formed one; a 200
without it, the request's reservation; a stream cut before its usage chunk, the prompt's bound
and, per the text relayed, its UTF-8 bytes plus one per event (a byte-level BPE token covers at
least one byte; the one per event covers a special token the server strips from the text),
within the reservation.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
from starlette.responses import Response, StreamingResponse

from inference.gateway.admission import Admission, Ticket
from inference.gateway.errors import GatewayError, backend_error, sse_error
from inference.gateway.sse import SSEMeter
from inference.ports import LedgerState

log = logging.getLogger(__name__)

CHAT = "/v1/chat/completions"

# Statuses recorded in the ledger for streams that did not end normally (the client saw 200).
STATUS_CLIENT_GONE = 499
STATUS_BACKEND_BROKE = 502


class MeteredStream(StreamingResponse):
    """Ends the relay explicitly, so a client that hangs up is metered at once (and one that
    hung up before the first byte is metered too)."""

    def __init__(self, relay: Relay, headers: dict[str, str]) -> None:
        super().__init__(relay.events(), headers=headers, media_type="text/event-stream")
        self.relay = relay

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()  # type: ignore[attr-defined]
                await self.relay.finish()


async def plain_response(
    gw: Admission, ticket: Ticket, response: httpx.Response, headers: dict[str, str]
) -> Response:
    """A whole JSON answer (or a backend error, passed on with its status)."""
    path = ticket.path
    try:
        content = await response.aread()
    except httpx.HTTPError:
        gw.settle(ticket, 502, "error")
        raise GatewayError(502, "the backend failed while answering", "backend_error") from None
    finally:
        await response.aclose()
    status = response.status_code
    prompt = completion = 0
    if status == 200:
        try:
            answer = json.loads(content)
        except ValueError:
            answer = None
        usage = usage_of(answer.get("usage") if isinstance(answer, dict) else None)
        prompt, completion = usage or reserved_usage(ticket, "an answer")
    else:
        gw.metrics.errors.labels(path, f"backend_{status}").inc()
        status, content = backend_error(status, content)  # OpenAI's shape and types
    gw.settle(ticket, status, "ok" if status == 200 else "error", prompt, completion)
    media = "application/json" if status != 200 else response.headers.get("content-type")
    return Response(content, status, headers=headers, media_type=media)


class Relay:
    """Passes a backend stream through event by event and meters it, however it ends."""

    def __init__(
        self, gw: Admission, ticket: Ticket, response: httpx.Response, wants_usage: bool
    ) -> None:
        self.gw, self.ticket, self.response = gw, ticket, response
        self.path, self.model, self.started = ticket.path, ticket.model, ticket.started
        self.meter = SSEMeter(wants_usage, chat=self.path == CHAT)
        self.status = STATUS_CLIENT_GONE  # until the stream ends one way or the other
        self._finished = False

    async def events(self) -> AsyncIterator[bytes]:
        meter = self.meter
        try:
            async for chunk in self.response.aiter_raw():
                out = meter.feed(chunk)
                if meter.done:  # before the yield: the client may hang up as soon as it reads it
                    self.status = 200
                if out:
                    yield out
            tail = meter.tail()
            if tail:
                yield tail
            if not meter.done:  # the backend closed without [DONE]: a cut-short stream
                self.status = STATUS_BACKEND_BROKE
                yield sse_error("the inference backend closed the stream early")
        except httpx.HTTPError as exc:
            self.status = STATUS_BACKEND_BROKE
            self.gw.metrics.backend_up.labels("local").set(0)
            yield sse_error(
                f"the inference backend failed mid-stream ({type(exc).__name__}); "
                "the partial answer above was metered",
                "server_error",
                "backend_stream_error",
            )

    async def finish(self) -> None:
        """Meter the request once and release the backend connection."""
        if self._finished:
            return
        self._finished = True
        gw, meter = self.gw, self.meter
        usage = usage_of(meter.usage)
        if usage is not None:
            prompt, completion = usage
        elif self.status == 200:  # ended with [DONE] but no (usable) usage chunk
            prompt, completion = reserved_usage(self.ticket, "a stream")
        else:  # cut short before the usage chunk: the prompt's bound, the text's bound
            reserved = self.ticket.reservation
            prompt = reserved.prompt_tokens
            relayed = meter.text_bytes + meter.data_events
            completion = min(relayed, reserved.completion_tokens)
        if self.status != 200:
            gw.metrics.errors.labels(self.path, f"stream_{self.status}").inc()
        if meter.first_token_at is not None:
            gw.metrics.ttft.labels(self.model).observe(meter.first_token_at - self.started)
        state: LedgerState = {200: "ok", STATUS_CLIENT_GONE: "cancelled"}.get(self.status, "error")
        gw.settle(self.ticket, self.status, state, prompt, completion)
        await self.response.aclose()


def usage_of(usage: object) -> tuple[int, int] | None:
    """(prompt, completion) tokens of a backend's usage object; None when it is missing or
    malformed (not counts, negative)."""
    if not isinstance(usage, dict):
        return None
    counts = (usage.get("prompt_tokens"), usage.get("completion_tokens"))
    if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
        return None
    return counts  # type: ignore[return-value]


def reserved_usage(ticket: Ticket, what: str) -> tuple[int, int]:
    """A 200 without usable usage is charged the reservation: an upper bound of what it used."""
    r = ticket.reservation
    log.warning(
        "request %s: %s without usage from the backend, charged its reservation (%d+%d tokens)",
        ticket.request_id,
        what,
        r.prompt_tokens,
        r.completion_tokens,
    )
    return r.prompt_tokens, r.completion_tokens
