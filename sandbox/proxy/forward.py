"""Relay one HTTP/1.1 exchange to an already opened upstream, streaming both bodies."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable

from sandbox.proxy.http1 import (
    HOP_BY_HOP,
    Head,
    HttpError,
    copy_body,
    read_head,
    request_framing,
    response_framing,
    serialize,
)
from sandbox.proxy.splice import close_quietly as close_quietly  # re-exported: callers use it


async def forward_exchange(
    client_r: asyncio.StreamReader,
    client_w: asyncio.StreamWriter,
    request: Head,
    upstream_r: asyncio.StreamReader,
    upstream_w: asyncio.StreamWriter,
    *,
    target: str,
    host_header: str,
    drop: Iterable[str] = (),
    add: Iterable[tuple[str, str]] = (),
    secret: str | None = None,
) -> bool:
    """Send `request` upstream as `target`, relay the answer; True if the client may send more.

    One upstream connection per exchange (`Connection: close` upstream): simple, and it makes
    every request go through the decision again."""
    framing = request_framing(request)
    method = request.first[0]
    drop_names = {*HOP_BY_HOP, "host", *request.connection_tokens(), *(d.lower() for d in drop)}
    headers = [("Host", host_header), *request.without(drop_names), *add, ("Connection", "close")]
    upstream_w.write(serialize((method, target, "HTTP/1.1"), headers))
    # The body goes up concurrently: a client using Expect: 100-continue waits for the answer.
    body = asyncio.create_task(copy_body(client_r, upstream_w, framing, client_w))
    try:
        while True:
            response = await _head_unless_body_fails(upstream_r, body)
            if response is None:
                raise HttpError(502, "upstream closed without answering")
            status = int(response.first[1]) if response.first[1].isdigit() else 0
            if not 100 <= status <= 599:
                raise HttpError(502, "upstream sent a bad status line")
            if status == 101:
                raise HttpError(502, "protocol upgrades are not relayed")
            if status >= 200:
                break
            client_w.write(serialize(response.first, response.without(HOP_BY_HOP)))
        res_framing = response_framing(response, method)
        keep = res_framing[0] != "close" and request.keep_alive()
        drop_res = {*HOP_BY_HOP, *response.connection_tokens()}
        out = [
            (k, v) for k, v in response.without(drop_res) if not (secret and secret in v)
        ]  # never echo the injected key back into the sandbox
        out.append(("Connection", "keep-alive" if keep else "close"))
        client_w.write(serialize(("HTTP/1.1", *response.first[1:]), out))
        await client_w.drain()
        await copy_body(upstream_r, client_w, res_framing, upstream_w)
        if not body.done():  # answered before the body was read: the stream is out of step
            keep = False
        else:
            body.result()
        return keep
    finally:
        if not body.done():
            body.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await body


async def _head_unless_body_fails(
    upstream_r: asyncio.StreamReader, body: asyncio.Task[None]
) -> Head | None:
    """The upstream's next head; but a request body refused mid-way (bad chunk framing) ends the
    exchange with its error at once, instead of waiting on an upstream that waits for the rest."""
    head = asyncio.ensure_future(read_head(upstream_r))
    if not body.done():
        await asyncio.wait({head, body}, return_when=asyncio.FIRST_COMPLETED)
    if body.done() and not head.done() and body.exception() is not None:
        head.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await head
        raise body.exception()  # type: ignore[misc]
    return await head
