"""The proxy's fixed-length plain-HTTP bodies on real sockets (tests/integration/relay_harness.py):
bodies both ways on a keep-alive connection with pipelined requests, a body cut short, and the
transports that are never spliced (TLS, no socket).

Every relay test runs twice: spliced in the kernel (os.splice through a pipe) and on the copying
path the proxy falls back to where splice is not available; both must behave the same. CONNECT
tunnels: test_proxy_splice.py."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
from pathlib import Path

import pytest

from sandbox.proxy import splice as splice_mod
from tests.integration.relay_harness import (
    MB,
    RelayPath,
    fd_count,
    read_all,
    relay,
    run,
    settle,
    sha,
    use_relay_path,
)

pytestmark = pytest.mark.integration


@pytest.fixture(params=["splice", "copy"])
def relay_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> RelayPath:
    return use_relay_path(request.param, monkeypatch)


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
