"""A harness for the egress proxy on real sockets: a unix socket in front, loopback origins
behind, fake names.

Names like `origin.test` resolve (through an injected resolver) to 127.0.0.1, so the policy must
say `allow_private` for them; nothing leaves the machine. Used by test_egress_proxy.py,
test_egress_approvals.py and test_proxy_request_rules.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sandbox.policy import Endpoint, Network
from sandbox.proxy import ApprovalBroker, EgressProxy, InferenceRoute, MemoryAudit
from sandbox.proxy.http1 import Head, read_head

KEY = "sk-sandbox-secret-0123456789"


def run(coro: Awaitable[None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 20))  # type: ignore[arg-type]


# --- loopback servers -----------------------------------------------------------------------


async def _read_body(reader: asyncio.StreamReader, head: Head) -> bytes:
    if (head.get("transfer-encoding") or "").lower() == "chunked":
        out = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                return out
            out += await reader.readexactly(size)
            await reader.readexactly(2)
    return await reader.readexactly(int(head.get("content-length") or 0))


def _json_response(payload: dict[str, Any], status: int = 200) -> bytes:
    body = json.dumps(payload).encode()
    return (
        f"HTTP/1.1 {status} OK\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


@dataclass
class HttpOrigin:
    """Echoes what it got; `/stream` answers SSE events 0.2 s apart, chunked."""

    seen: list[dict[str, Any]] = field(default_factory=list)
    port: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while (head := await read_head(reader)) is not None:
                body = await _read_body(reader, head)
                record = {
                    "method": head.first[0],
                    "target": head.first[1],
                    "headers": {k.lower(): v for k, v in head.headers},
                    "body": body.decode(),
                }
                self.seen.append(record)
                if head.first[1].endswith("/stream"):
                    writer.write(
                        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                        b"Transfer-Encoding: chunked\r\n\r\n"
                    )
                    for i in range(3):
                        event = f"data: {i}\n\n".encode()
                        writer.write(f"{len(event):x}\r\n".encode() + event + b"\r\n")
                        await writer.drain()
                        await asyncio.sleep(0.2)
                    writer.write(b"0\r\n\r\n")
                else:
                    writer.write(_json_response(record))
                await writer.drain()
                if (head.get("connection") or "").lower() == "close":
                    break
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


@dataclass
class Env:
    proxy: EgressProxy
    broker: ApprovalBroker
    audit: MemoryAudit
    origin: HttpOrigin
    gateway: HttpOrigin
    echo_port: int
    sock: str
    persisted: list[tuple[str, Endpoint]]

    async def open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_unix_connection(self.sock)

    def events(self, name: str) -> list[dict[str, Any]]:
        return [r for r in self.audit.records if r["event"] == name]


class Recorder:
    def __init__(self, into: list[tuple[str, Endpoint]]) -> None:
        self.into = into

    async def persist_allow(self, sandbox: str, endpoint: Endpoint) -> None:
        self.into.append((sandbox, endpoint))


def network(*allow: dict[str, Any], deny: list[dict[str, Any]] | None = None,
            mode: str = "deny", hold: float = 5.0) -> Network:  # fmt: skip
    return Network.model_validate(
        {"allow": list(allow), "deny": deny or [], "approval": {"mode": mode, "hold_seconds": hold}}
    )


@contextlib.asynccontextmanager
async def environment(tmp_path: Path, net: Network, private_ok: bool = False) -> AsyncIterator[Env]:
    origin, gateway = HttpOrigin(), HttpOrigin()
    servers = [
        await asyncio.start_server(origin.handle, "127.0.0.1", 0),
        await asyncio.start_server(gateway.handle, "127.0.0.1", 0),
        await asyncio.start_server(_echo, "127.0.0.1", 0),
    ]
    origin.port, gateway.port, echo_port = (s.sockets[0].getsockname()[1] for s in servers)
    names = {
        "origin.test": ["127.0.0.1"],
        "echo.test": ["127.0.0.1"],
        "api.origin.test": ["127.0.0.1"],
        "unknown.test": ["127.0.0.1"],
        "metadata.test": ["169.254.169.254"],
        "mapped.test": ["::ffff:127.0.0.1"],
        "ten.test": ["10.1.2.3"],
    }

    async def resolver(host: str, port: int) -> list[str]:
        if host not in names:
            raise OSError(f"no such name {host}")
        return names[host]

    audit, persisted = MemoryAudit(), []
    broker = ApprovalBroker(writer=Recorder(persisted), audit=audit)
    sock = str(tmp_path / "egress.sock")
    proxy = EgressProxy(
        "sb1", sock, net, resolver=resolver, approvals=broker, audit=audit,
        inference=InferenceRoute(f"http://127.0.0.1:{gateway.port}", KEY),
        approved_may_be_private=private_ok,
    )  # fmt: skip
    async with proxy:
        try:
            yield Env(proxy, broker, audit, origin, gateway, echo_port, sock, persisted)
        finally:
            for s in servers:
                s.close()


async def exchange(env: Env, raw: bytes) -> tuple[int, Head, bytes]:
    reader, writer = await env.open()
    try:
        writer.write(raw)
        await writer.drain()
        return await read_response(reader)
    finally:
        writer.close()


async def read_response(reader: asyncio.StreamReader) -> tuple[int, Head, bytes]:
    head = await read_head(reader)
    assert head is not None
    return int(head.first[1]), head, await _read_body(reader, head)


def get(url: str, host: str, method: str = "GET", extra: str = "") -> bytes:
    return f"{method} {url} HTTP/1.1\r\nHost: {host}\r\n{extra}Content-Length: 0\r\n\r\n".encode()


ORIGIN_RO = {"host": "origin.test", "ports": [0], "access": "read-only",
             "paths": ["/api/**"], "allow_private": True}  # fmt: skip


def origin_rule(env_port: int, **over: Any) -> dict[str, Any]:
    return {**ORIGIN_RO, "ports": [env_port], **over}


async def with_origin_port(
    tmp_path: Path, make: Callable[[int], Network], body: Callable[[Env], Awaitable[None]]
) -> None:
    """The origin's port is only known once it listens: build the rules then, and reload."""
    async with environment(tmp_path, network()) as env:
        env.proxy.update_network(make(env.origin.port))
        await body(env)
