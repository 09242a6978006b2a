"""The gateway's listener: uvicorn's h11 protocol with the limits a slow or greedy client hits
before any request handler runs.

A slowloris connection whose headers never end, a body that trickles in, a flood of connections
from one address, a header block of a megabyte: all of it happens below ASGI, so it is refused
here, per connection, with an OpenAI-shaped error written on the socket:

- headers must be complete within `header_timeout_s` of the connection's first byte (or of the
  previous answer, on a kept-alive connection): else 408 and closed;
- the body must be complete within `body_timeout_s` of the headers: else 408 (or, when the handler
  has already answered, just closed);
- more than `max_header_bytes` of request line and headers: 431 (h11 stops buffering there);
- anything h11 cannot parse as HTTP/1.1: 400;
- more than `max_connections_per_client` open connections from one address: 429 on the new one;
  more than `max_connections` in all: 503;
- after an early answer (a 413, a 401 before the body was read) at most `max_body_bytes` more
  body is read and dropped, so the client can finish sending and read the answer.

A refused connection is answered, half-closed and then closed after a short linger (reading and
dropping what the client is still sending), so the client reads the answer instead of a reset.
"""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from inference.gateway.errors import raw_error_response
from inference.gateway.settings import ListenerLimits

LINGER_S = 1.0  # how long a refused connection is drained before it is closed
_END_OF_HEAD = re.compile(rb"\n\r?\n")  # the blank line after the headers, as h11 reads it


class _Guarded(H11Protocol):
    """Subclassed per server by `guarded_protocol`, which sets these two."""

    limits: ListenerLimits
    open_per_client: Counter[str]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._peer: str | None = None  # counted in open_per_client under this address
        self._deadline: asyncio.TimerHandle | None = None
        self._phase: str | None = None  # "headers" | "body" | None: what the deadline guards
        self._refused = False
        self._dropped = 0  # body bytes read and dropped after an early answer

    # -- connections ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        peer = self.client[0] if self.client else None
        cls = type(self)
        if len(self.connections) > self.limits.max_connections:
            self._refuse(503, "the gateway has too many open connections", "too_many_connections")
            return
        if peer is not None:
            if self.open_per_client[peer] >= self.limits.max_connections_per_client:
                self._refuse(
                    429,
                    f"too many open connections from {peer} "
                    f"(limit {self.limits.max_connections_per_client})",
                    "too_many_connections",
                    type_="rate_limit_error",
                )
                return
            cls.open_per_client[peer] += 1
            self._peer = peer
        self._sync_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._peer is not None:
            counts = type(self).open_per_client
            counts[self._peer] -= 1
            if counts[self._peer] <= 0:
                del counts[self._peer]
            self._peer = None
        self._cancel_deadline()
        super().connection_lost(exc)

    # -- reading -------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # draining a refused connection: drop it
        if self.conn.their_state is h11.IDLE and self._head_too_large(data):
            self._refuse_head()
            return
        cycle = self.cycle
        if cycle is not None and cycle.response_complete and self.conn.their_state is h11.SEND_BODY:
            # answered early; h11 drops the rest of the body, but only so much of it
            self._dropped += len(data)
            if self._dropped > self.limits.max_body_bytes:
                self._close()
                return
        super().data_received(data)

    def _head_too_large(self, data: bytes) -> bool:
        """Whether the header block being received ends past max_header_bytes. h11 itself only
        limits a block that is still incomplete after a read, so one that arrives whole in a
        single read would pass at any size."""
        limit = self.limits.max_header_bytes
        pending = self.conn.trailing_data[0]
        if len(pending) + len(data) <= limit:
            return False
        head = (pending + data[: limit + 1])[: limit + 1]
        return _END_OF_HEAD.search(head, 0, limit) is None

    def _refuse_head(self) -> None:
        limit = self.limits.max_header_bytes
        self._refuse(431, f"request line and headers exceed {limit} bytes", "headers_too_large")

    def handle_events(self) -> None:
        super().handle_events()
        if not self._refused:
            self._sync_deadline()

    def send_400_response(self, msg: str) -> None:
        """h11 could not parse the request: too-long headers (431) or not HTTP/1.1 (400)."""
        if len(self.conn.trailing_data[0]) > self.limits.max_header_bytes:
            self._refuse_head()
        else:
            self._refuse(400, "malformed HTTP/1.1 request", "invalid_http")

    # -- deadlines -----------------------------------------------------------------------

    def _sync_deadline(self) -> None:
        """Arm the deadline of the phase the client is in: its headers, its body, or none
        (while the handler works and answers, which the backend's own timeouts bound)."""
        their = self.conn.their_state
        phase = "headers" if their is h11.IDLE else "body" if their is h11.SEND_BODY else None
        if phase == self._phase:
            return
        self._cancel_deadline()
        self._phase = phase
        if phase is not None:
            limits = self.limits
            delay = limits.header_timeout_s if phase == "headers" else limits.body_timeout_s
            self._deadline = self.loop.call_later(delay, self._expired, phase)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self._phase = None

    def _expired(self, phase: str) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        if phase == "headers":
            if not self.conn.trailing_data[0]:
                self._close()  # idle between requests: nothing to answer
                return
            self._refuse(
                408,
                f"the request headers did not arrive within {self.limits.header_timeout_s} s",
                "request_timeout",
            )
            return
        # The handler reads a disconnect and what it sends is dropped; the client gets a 408,
        # or, if the handler had already answered, the connection just closes.
        self._refuse(
            408,
            f"the request body did not arrive within {self.limits.body_timeout_s} s",
            "request_timeout",
        )

    # -- refusing ------------------------------------------------------------------------

    def _refuse(self, status: int, message: str, code: str, type_: str | None = None) -> None:
        """Answer, stop writing, drain what the client still sends for a moment, close. If the
        handler has already answered this request, a second answer would corrupt the stream:
        just close."""
        answered = self._phase == "body" and self.cycle is not None and self.cycle.response_started
        self._refused = True
        self._cancel_deadline()
        if self.cycle is not None:
            self.cycle.disconnected = True
            self.cycle.message_event.set()
        transport = self.transport
        if transport.is_closing():
            return
        if answered:
            self._close()
            return
        transport.write(raw_error_response(status, message, code, type_))
        if transport.can_write_eof():
            transport.write_eof()
        self.loop.call_later(LINGER_S, self._close)

    def _close(self) -> None:
        self._cancel_deadline()
        if not self.transport.is_closing():
            self.transport.close()


def guarded_protocol(limits: ListenerLimits) -> type[H11Protocol]:
    """An h11 protocol class enforcing `limits`, with its own per-address connection counts."""
    return type(
        "GatewayH11Protocol",
        (_Guarded,),
        {"limits": limits, "open_per_client": Counter()},
    )


def serve(app: Any, host: str, port: int, limits: ListenerLimits) -> None:
    """Run the gateway's ASGI app on host:port with `limits` until SIGTERM/SIGINT."""
    import uvicorn

    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        http=guarded_protocol(limits),
        ws="none",
        h11_max_incomplete_event_size=limits.max_header_bytes,
        timeout_keep_alive=limits.keep_alive_timeout_s,  # type: ignore[arg-type]
        log_level="warning",
        access_log=False,
    )
    uvicorn.Server(config).run()
