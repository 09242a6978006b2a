"""A harness for the proxy's byte relays on real sockets: a loopback origin running a test's
handler, an egress proxy allowed to reach it as `origin.test`, and the relay path under test.

`use_relay_path` runs a test spliced in the kernel (os.splice through a pipe) or on the copying
path the proxy falls back to where splice is not available, and counts the spliced flows. Used by
test_proxy_splice.py and test_proxy_splice_bodies.py."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from sandbox.policy import Network
from sandbox.proxy import ApprovalBroker, EgressProxy, MemoryAudit
from sandbox.proxy import splice as splice_mod

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
MB = 1024 * 1024


def run(coro: Awaitable[None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 30))  # type: ignore[arg-type]


class RelayPath:
    """Which relay path a test runs on, and how many spliced flows it started."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.flows = 0

    def expect(self, spliced: int) -> None:
        assert self.flows == (spliced if self.mode == "splice" else 0), (self.mode, self.flows)


def use_relay_path(mode: str, monkeypatch: pytest.MonkeyPatch) -> RelayPath:
    """Force the copying path ("copy") or require splice ("splice"), and count spliced flows."""
    path = RelayPath(mode)
    if mode == "copy":
        monkeypatch.setattr(splice_mod, "available", lambda: False)
    elif not splice_mod.available():
        pytest.skip("os.splice is not available here")
    real_start = splice_mod._Flow.start

    def counting(self: splice_mod._Flow) -> splice_mod._Flow:
        path.flows += 1
        return real_start(self)

    monkeypatch.setattr(splice_mod._Flow, "start", counting)
    return path


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


@contextlib.asynccontextmanager
async def relay(tmp_path: Path, handler: Handler) -> AsyncIterator[tuple[str, int, EgressProxy]]:
    """An origin on loopback running `handler`, and a proxy allowed to reach it as origin.test."""
    origin_side: set[asyncio.StreamWriter] = set()

    async def tracked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        origin_side.add(writer)
        await handler(reader, writer)

    server = await asyncio.start_server(tracked, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    net = Network.model_validate(
        {"allow": [{"host": "origin.test", "ports": [port], "allow_private": True}],
         "approval": {"mode": "deny"}}
    )  # fmt: skip

    async def resolver(host: str, port: int) -> list[str]:
        return ["127.0.0.1"]

    audit = MemoryAudit()
    sock = str(tmp_path / "egress.sock")
    proxy = EgressProxy(
        "sb", sock, net, resolver=resolver, approvals=ApprovalBroker(audit=audit), audit=audit
    )
    try:
        async with proxy:
            yield sock, port, proxy
            await settle(proxy, fd_count())
    finally:
        server.close()
        for writer in origin_side:  # handlers a test left waiting
            writer.close()
        await asyncio.sleep(0.05)


async def tunnel(
    sock: str, port: int, early: bytes = b""
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_unix_connection(sock)
    writer.write(f"CONNECT origin.test:{port} HTTP/1.1\r\n\r\n".encode() + early)
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    return reader, writer


async def send_all(writer: asyncio.StreamWriter, data: bytes, piece: int = MB) -> None:
    for i in range(0, len(data), piece):
        writer.write(data[i : i + piece])
        await writer.drain()


async def read_all(reader: asyncio.StreamReader) -> bytes:
    out = bytearray()
    while chunk := await reader.read(MB):
        out += chunk
    return bytes(out)


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(256 * 1024):
            writer.write(data)
            await writer.drain()
    writer.close()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def settle(proxy: EgressProxy, baseline: int) -> None:
    """Wait (a little) until the proxy has let go of every connection and fd."""
    for _ in range(100):
        if not proxy._tasks and fd_count() <= baseline:
            return
        await asyncio.sleep(0.02)
