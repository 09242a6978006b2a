"""The proxy's byte relays on real sockets: CONNECT tunnels and fixed-length plain-HTTP bodies.

Every test runs twice: spliced in the kernel (os.splice through a pipe) and on the copying path
the proxy falls back to where splice is not available; both must behave the same."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from sandbox.policy import Network
from sandbox.proxy import ApprovalBroker, EgressProxy, MemoryAudit
from sandbox.proxy import splice as splice_mod

pytestmark = pytest.mark.integration

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


@pytest.fixture(params=["splice", "copy"])
def relay_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> RelayPath:
    path = RelayPath(request.param)
    if request.param == "copy":
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


# --- CONNECT tunnels ----------------------------------------------------------------------------


def test_large_transfer_both_ways_intact(tmp_path: Path, relay_path: RelayPath) -> None:
    payload = os.urandom(24 * MB)

    async def main() -> None:
        async with relay(tmp_path, echo) as (sock, port, _):
            reader, writer = await tunnel(sock, port)
            sender = asyncio.create_task(send_all(writer, payload))
            got = await reader.readexactly(len(payload))  # reads while it sends: back-pressure
            await sender
            assert sha(got) == sha(payload)
            writer.write_eof()
            assert await reader.read() == b""
            writer.close()

    run(main())
    relay_path.expect(2)


def test_bytes_pipelined_after_connect_go_first(tmp_path: Path, relay_path: RelayPath) -> None:
    async def main() -> None:
        async with relay(tmp_path, echo) as (sock, port, _):
            reader, writer = await tunnel(sock, port, early=b"early bytes|")
            writer.write(b"later bytes")
            assert await reader.readexactly(23) == b"early bytes|later bytes"
            writer.close()

    run(main())


def test_origin_speaking_first_comes_after_the_200(tmp_path: Path, relay_path: RelayPath) -> None:
    async def banner(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 hello from the origin\r\n")  # before the proxy has answered 200
        await echo(reader, writer)

    async def main() -> None:
        async with relay(tmp_path, banner) as (sock, port, _):
            reader, writer = await tunnel(sock, port)
            assert await reader.readuntil(b"\r\n") == b"220 hello from the origin\r\n"
            writer.write(b"ping")
            assert await reader.readexactly(4) == b"ping"
            writer.close()

    run(main())


def test_client_half_close_then_origin_answers(tmp_path: Path, relay_path: RelayPath) -> None:
    upload = os.urandom(5 * MB + 123)

    async def digest_after_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await read_all(reader)  # EOF from the client arrives while we can still write
        writer.write(sha(data).encode())
        await writer.drain()
        writer.close()

    async def main() -> None:
        async with relay(tmp_path, digest_after_eof) as (sock, port, _):
            reader, writer = await tunnel(sock, port)
            await send_all(writer, upload)
            writer.write_eof()
            assert (await read_all(reader)).decode() == sha(upload)
            writer.close()

    run(main())


def test_origin_half_close_then_client_still_sends(tmp_path: Path, relay_path: RelayPath) -> None:
    download, upload = os.urandom(3 * MB), os.urandom(4 * MB + 7)
    received: asyncio.Future[str] | None = None

    async def send_then_listen(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await send_all(writer, download)
        writer.write_eof()  # our side is done; the client's is not
        assert received is not None
        received.set_result(sha(await read_all(reader)))
        writer.close()

    async def main() -> None:
        nonlocal received
        received = asyncio.get_running_loop().create_future()
        async with relay(tmp_path, send_then_listen) as (sock, port, _):
            reader, writer = await tunnel(sock, port)
            assert sha(await read_all(reader)) == sha(download)  # EOF passed on
            await send_all(writer, upload)  # ... and the other way still works
            writer.write_eof()
            assert await received == sha(upload)
            writer.close()

    run(main())


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with an RST rather than a FIN."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def test_origin_reset_tears_the_tunnel_down(tmp_path: Path, relay_path: RelayPath) -> None:
    async def reset_midway(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(MB)
        writer.write(b"x" * MB)
        await writer.drain()
        _reset(writer)

    async def main() -> None:
        async with relay(tmp_path, reset_midway) as (sock, port, proxy):
            baseline = fd_count()
            reader, writer = await tunnel(sock, port)
            uploading = asyncio.create_task(send_all(writer, os.urandom(64 * MB)))
            with contextlib.suppress(ConnectionError):
                await read_all(reader)  # ends: EOF or reset, never hangs
            with contextlib.suppress(ConnectionError):
                await asyncio.wait_for(uploading, 10)
            writer.close()
            await settle(proxy, baseline)
            assert not proxy._tasks
            assert fd_count() <= baseline

    run(main())


def test_client_reset_tears_the_tunnel_down(tmp_path: Path, relay_path: RelayPath) -> None:
    origin_done: asyncio.Future[None] | None = None

    async def stream_forever(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert origin_done is not None
        with contextlib.suppress(ConnectionError):
            while True:
                writer.write(b"y" * MB)
                await writer.drain()
        origin_done.set_result(None)
        writer.close()

    async def main() -> None:
        nonlocal origin_done
        origin_done = asyncio.get_running_loop().create_future()
        async with relay(tmp_path, stream_forever) as (sock, port, proxy):
            baseline = fd_count()
            reader, writer = await tunnel(sock, port)
            await reader.readexactly(3 * MB)
            _reset(writer)
            await asyncio.wait_for(origin_done, 10)  # the origin's connection went too
            await settle(proxy, baseline)
            assert not proxy._tasks
            assert fd_count() <= baseline

    run(main())


def test_client_gone_closes_an_idle_origin(tmp_path: Path, relay_path: RelayPath) -> None:
    """The origin never speaks again, so only tearing both sides down can release it."""
    origin_saw_close: asyncio.Future[None] | None = None

    async def speak_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert origin_saw_close is not None
        writer.write(b"w" * (2 * MB))  # more than the client will have read when it goes
        with contextlib.suppress(ConnectionError):
            await read_all(reader)
        origin_saw_close.set_result(None)
        writer.close()

    async def main() -> None:
        nonlocal origin_saw_close
        origin_saw_close = asyncio.get_running_loop().create_future()
        async with relay(tmp_path, speak_once) as (sock, port, proxy):
            baseline = fd_count()
            reader, writer = await tunnel(sock, port)
            await reader.readexactly(1000)
            writer.write(b"q" * 1000)
            await writer.drain()
            await asyncio.sleep(0.1)  # unread bytes in our buffer: closing now resets
            writer.transport.abort()
            await asyncio.wait_for(origin_saw_close, 5)
            await settle(proxy, baseline)
            assert fd_count() <= baseline

    run(main())


def test_back_pressure_stops_reading_from_the_origin(tmp_path: Path, relay_path: RelayPath) -> None:
    total, block = 96 * MB, os.urandom(MB)
    sent = 0

    async def big_stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal sent
        with contextlib.suppress(ConnectionError):
            for _ in range(total // MB):
                writer.write(block)
                await writer.drain()
                sent += MB
        writer.close()

    async def main() -> None:
        async with relay(tmp_path, big_stream) as (sock, port, _):
            reader, writer = await tunnel(sock, port)
            await asyncio.sleep(1.0)  # the client reads nothing
            # Only socket buffers and one pipe can hold bytes (the kernel's TCP autotuning may
            # grow the proxy's receive buffer to tcp_rmem's max): nowhere near everything.
            assert sent < total * 2 // 3, sent
            print(f"held back: the origin got {sent // MB} MB out of {total // MB} MB")
            digest, expected = hashlib.sha256(), hashlib.sha256()
            got = 0
            while chunk := await reader.read(MB):
                digest.update(chunk)
                got += len(chunk)
            for _ in range(total // MB):
                expected.update(block)
            assert got == total and digest.hexdigest() == expected.hexdigest()
            writer.close()

    run(main())


def test_many_tunnels_leak_no_fds(tmp_path: Path, relay_path: RelayPath) -> None:
    async def main() -> None:
        async with relay(tmp_path, echo) as (sock, port, proxy):
            reader, writer = await tunnel(sock, port)  # warm up: lazily opened fds stay
            writer.close()
            await settle(proxy, fd_count())
            baseline = fd_count()
            for i in range(20):
                reader, writer = await tunnel(sock, port, early=b"e" * i)
                writer.write(b"z" * 100_000)
                await reader.readexactly(100_000 + i)
                if i % 2:
                    _reset(writer)
                else:
                    writer.write_eof()
                    assert await reader.read() == b""
                    writer.close()
            await settle(proxy, baseline)
            assert fd_count() <= baseline

    run(main())
    relay_path.expect(42)


# --- plain HTTP bodies --------------------------------------------------------------------------


async def http_origin(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """GET /bytes/N: N pattern bytes; POST: the sha256 of the body; /short: a truncated body."""
    with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
        while head := (await reader.readuntil(b"\r\n\r\n")).decode():
            method, target = head.split(" ", 2)[:2]
            length = next(
                (int(line.split(":")[1]) for line in head.split("\r\n")
                 if line.lower().startswith("content-length:")), 0,
            )  # fmt: skip
            if method == "POST":
                body = sha(await reader.readexactly(length)).encode()
            elif target == "/short":
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + b"s" * 100_000)
                await writer.drain()
                break
            else:
                body = pattern(int(target.rsplit("/", 1)[1]))
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
            await writer.drain()
    writer.close()


def pattern(n: int) -> bytes:
    return (hashlib.sha256(str(n).encode()).digest() * (n // 32 + 1))[:n]


async def response(reader: asyncio.StreamReader) -> bytes:
    head = (await reader.readuntil(b"\r\n\r\n")).decode()
    assert head.startswith("HTTP/1.1 200"), head
    length = next(
        int(line.split(":")[1])
        for line in head.split("\r\n")
        if line.lower().startswith("content-")
    )
    return await reader.readexactly(length)


def test_plain_bodies_both_ways_and_keep_alive(tmp_path: Path, relay_path: RelayPath) -> None:
    big, small = os.urandom(6 * MB + 5), os.urandom(100_000)  # both over SPLICE_MIN

    async def main() -> None:
        async with relay(tmp_path, http_origin) as (sock, port, _):
            reader, writer = await asyncio.open_unix_connection(sock)
            base = f"http://origin.test:{port}"
            host = f"Host: origin.test:{port}\r\n"

            def post(body: bytes) -> bytes:
                head = f"POST {base}/up HTTP/1.1\r\n{host}Content-Length: {len(body)}\r\n\r\n"
                return head.encode() + body

            def get(n: int) -> bytes:
                return f"GET {base}/bytes/{n} HTTP/1.1\r\n{host}\r\n".encode()

            # All pipelined in one write: the small body and the request behind it are already in
            # the proxy's buffer when the body is relayed, which must take exactly its own bytes.
            writer.write(post(big) + get(9 * MB) + post(small) + get(100))
            assert await response(reader) == sha(big).encode()
            assert sha(await response(reader)) == sha(pattern(9 * MB))
            assert await response(reader) == sha(small).encode()
            assert await response(reader) == pattern(100)  # small: copied, not spliced
            writer.write(get(2 * MB))  # the connection still reads after all that
            assert sha(await response(reader)) == sha(pattern(2 * MB))
            writer.close()

    run(main())
    relay_path.expect(4)


def test_plain_body_cut_short_closes_the_client(tmp_path: Path, relay_path: RelayPath) -> None:
    async def main() -> None:
        async with relay(tmp_path, http_origin) as (sock, port, proxy):
            baseline = fd_count()
            reader, writer = await asyncio.open_unix_connection(sock)
            writer.write(f"GET http://origin.test:{port}/short HTTP/1.1\r\n\r\n".encode())
            head = await reader.readuntil(b"\r\n\r\n")
            assert b"Content-Length: 1000000" in head
            body = await read_all(reader)  # the proxy closes rather than hanging
            assert body.startswith(b"s" * 100_000) and len(body) < 1_000_000
            writer.close()
            await settle(proxy, baseline)
            assert fd_count() <= baseline

    run(main())


# --- when not to splice -------------------------------------------------------------------------


class _StubTransport:
    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None: ...


class _StubWriter:
    def __init__(self, **extra: object) -> None:
        self.transport = _StubTransport()
        self._extra = extra

    def get_extra_info(self, name: str) -> object:
        return self._extra.get(name)


def test_tls_and_socketless_transports_are_never_spliced() -> None:
    with socket.socket() as sock:
        plain = _StubWriter(socket=sock)
        tls = _StubWriter(socket=sock, ssl_object=object())  # the socket carries ciphertext
        assert splice_mod._plain_socket(plain)  # type: ignore[arg-type]
        assert not splice_mod._plain_socket(tls)  # type: ignore[arg-type]
        assert not splice_mod._plain_socket(_StubWriter())  # type: ignore[arg-type]


def test_proxy_close_ends_live_tunnels(tmp_path: Path, relay_path: RelayPath) -> None:
    async def main() -> None:
        async with relay(tmp_path, echo) as (sock, port, proxy):
            baseline = fd_count()
            reader, writer = await tunnel(sock, port)
            writer.write(b"still here")
            assert await reader.readexactly(10) == b"still here"
            await proxy.close()  # e.g. the sandbox is removed
            assert await asyncio.wait_for(reader.read(), 5) == b""
            writer.close()
            await settle(proxy, baseline)
            assert fd_count() <= baseline

    run(main())
