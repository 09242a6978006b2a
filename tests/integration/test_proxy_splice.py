"""The proxy's CONNECT tunnels on real sockets (tests/integration/relay_harness.py): large
transfers both ways, pipelined and server-first bytes, half-closes, resets, back-pressure, and no
fd left behind.

Every test runs twice: spliced in the kernel (os.splice through a pipe) and on the copying path
the proxy falls back to where splice is not available; both must behave the same. Fixed-length
plain-HTTP bodies: test_proxy_splice_bodies.py."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import struct
from pathlib import Path

import pytest

from tests.integration.relay_harness import (
    MB,
    RelayPath,
    echo,
    fd_count,
    read_all,
    relay,
    run,
    send_all,
    settle,
    sha,
    tunnel,
    use_relay_path,
)

pytestmark = pytest.mark.integration


@pytest.fixture(params=["splice", "copy"])
def relay_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> RelayPath:
    return use_relay_path(request.param, monkeypatch)


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
