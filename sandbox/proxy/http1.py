"""Just enough HTTP/1.1 to relay messages without buffering bodies: heads, framing, copying."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterable
from dataclasses import dataclass

from sandbox.proxy.splice import splice_body

MAX_HEAD = 64 * 1024
CHUNK = 256 * 1024  # copying path only: fixed-length bodies and tunnels splice (splice.py)
STREAM_LIMIT = 1024 * 1024  # StreamReader buffer: big enough that bulk copies are not throttled

# Transfer-Encoding is not here on purpose: bodies are relayed in their own framing.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authorization",
        "proxy-authenticate",
        "te",
        "trailer",
        "upgrade",
    }
)
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_DIGITS = re.compile(r"^[0-9]{1,18}\Z")  # ASCII only: str.isdigit() also takes '²'
# A chunk-size line: hex digits only (int(x, 16) also takes '0x5', '+5', '1_0', ' 5 '), then
# optional extensions; no whitespace anywhere a parser might read differently.
_CHUNK_LINE = re.compile(rb"^([0-9A-Fa-f]{1,16})(;[!-~]*)?\r\n\Z")


class HttpError(Exception):
    """A malformed or unacceptable message: answer `status` and close."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass
class Head:
    """A request line (method, target, version) or status line (version, status, reason)."""

    first: tuple[str, str, str]
    headers: list[tuple[str, str]]

    def get(self, name: str) -> str | None:
        values = self.get_all(name)
        return values[0] if values else None

    def get_all(self, name: str) -> list[str]:
        name = name.lower()
        return [v for k, v in self.headers if k.lower() == name]

    def without(self, names: Iterable[str]) -> list[tuple[str, str]]:
        drop = {n.lower() for n in names}
        return [(k, v) for k, v in self.headers if k.lower() not in drop]

    def connection_tokens(self) -> set[str]:
        return {
            t.strip().lower() for v in self.get_all("connection") for t in v.split(",") if t.strip()
        }

    def keep_alive(self) -> bool:
        tokens = self.connection_tokens()
        if self.first[2] == "HTTP/1.0" or self.first[0] == "HTTP/1.0":
            return "keep-alive" in tokens
        return "close" not in tokens


async def read_head(reader: asyncio.StreamReader) -> Head | None:
    """One message head; None on a clean EOF before it starts."""
    try:
        raw = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if not exc.partial.strip():
            return None
        raise HttpError(400, "truncated message head") from None
    except asyncio.LimitOverrunError:
        raise HttpError(431, "message head too large") from None
    if len(raw) > MAX_HEAD:
        raise HttpError(431, "message head too large")
    try:
        text = raw.decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes anything
        raise HttpError(400, "undecodable head") from None
    lines = text[:-4].lstrip("\r\n").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) != 3 or any(c in lines[0] for c in "\n\r\0"):
        raise HttpError(400, "malformed start line")
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        if line[:1] in (" ", "\t"):
            raise HttpError(400, "folded header lines are not accepted")
        name, sep, value = line.partition(":")
        if not sep or not _TOKEN.match(name) or any(c in value for c in "\n\r\0"):
            raise HttpError(400, "malformed header line")
        headers.append((name, value.strip(" \t")))
    return Head((parts[0], parts[1], parts[2]), headers)


def serialize(first: tuple[str, str, str], headers: Iterable[tuple[str, str]]) -> bytes:
    out = [" ".join(first)]
    out.extend(f"{k}: {v}" for k, v in headers)
    return ("\r\n".join(out) + "\r\n\r\n").encode("latin-1")


def request_framing(head: Head) -> tuple[str, int]:
    """("none"|"length"|"chunked", n). Rejects the ambiguous framings used for smuggling."""
    te = head.get_all("transfer-encoding")
    cl = head.get_all("content-length")
    if te:
        if cl:
            raise HttpError(400, "both Transfer-Encoding and Content-Length")
        if len(te) != 1 or te[0].strip().lower() != "chunked":
            raise HttpError(400, "only Transfer-Encoding: chunked is accepted")
        return "chunked", 0
    if cl:
        if len(cl) != 1 or not _DIGITS.match(cl[0]):  # duplicates too, even when equal
            raise HttpError(400, "bad Content-Length")
        return "length", int(cl[0])
    return "none", 0


def response_framing(head: Head, request_method: str) -> tuple[str, int]:
    """("none"|"length"|"chunked"|"close", n) for a response to `request_method`."""
    status = int(head.first[1])
    if request_method == "HEAD" or 100 <= status < 200 or status in (204, 304):
        return "none", 0
    te = head.get_all("transfer-encoding")
    if te:
        last = te[-1].split(",")[-1].strip().lower()
        return ("chunked", 0) if last == "chunked" else ("close", 0)
    cl = head.get_all("content-length")
    if cl and len(set(cl)) == 1 and _DIGITS.match(cl[0]):
        return "length", int(cl[0])
    return "close", 0


async def _write(writer: asyncio.StreamWriter, data: bytes) -> None:
    writer.write(data)
    await writer.drain()  # back-pressure, and each piece leaves now (SSE arrives incrementally)


async def copy_exact(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    n: int,
    source: asyncio.StreamWriter | None = None,
) -> None:
    """Relay exactly `n` bytes; given `reader`'s own writer (`source`), in the kernel if we can."""
    spliced = await splice_body(reader, source, writer, n)
    if spliced is not None:
        if spliced < n:
            raise HttpError(502, "peer closed mid-body")
        return
    while n > 0:
        data = await reader.read(min(n, CHUNK))
        if not data:
            raise HttpError(502, "peer closed mid-body")
        n -= len(data)
        await _write(writer, data)


async def copy_until_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(CHUNK):
        await _write(writer, data)


async def copy_chunked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Relay a chunked body as it comes, chunk by chunk, checking the framing."""
    while True:
        try:
            line = await reader.readuntil(b"\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            raise HttpError(502, "bad chunk header") from None
        match = _CHUNK_LINE.match(line)
        if match is None:
            raise HttpError(400, "bad chunk size (hex digits only)")
        size = int(match.group(1), 16)
        if size == 0:
            trailer = line
            while True:  # trailers, then the empty line
                more = await reader.readuntil(b"\r\n")
                if b"\n" in more[:-2] or b"\r" in more[:-2]:
                    raise HttpError(400, "bad trailer line")
                trailer += more
                if more == b"\r\n":
                    break
            await _write(writer, trailer)
            return
        writer.write(line)
        await copy_exact(reader, writer, size)
        if await reader.readexactly(2) != b"\r\n":
            raise HttpError(400, "chunk not followed by CRLF")
        await _write(writer, b"\r\n")


async def copy_body(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    framing: tuple[str, int],
    source: asyncio.StreamWriter | None = None,
) -> None:
    """Relay one body in its framing; `source` (reader's writer) lets a fixed length be spliced."""
    kind, n = framing
    if kind == "length":
        await copy_exact(reader, writer, n, source)
    elif kind == "chunked":
        await copy_chunked(reader, writer)
    elif kind == "close":
        await copy_until_eof(reader, writer)


def error_response(status: int, reason: str) -> bytes:
    """A short plain-text answer that also names the reason in a header, then closes."""
    line = " ".join(reason.split())[:300].encode("ascii", "replace").decode("ascii")
    body = (line + "\n").encode("ascii")
    phrase = {400: "Bad Request", 403: "Forbidden", 404: "Not Found", 431: "Too Large",
              502: "Bad Gateway", 504: "Gateway Timeout"}.get(status, "Error")  # fmt: skip
    headers = [
        ("Content-Type", "text/plain; charset=utf-8"),
        ("Content-Length", str(len(body))),
        ("X-Appliance-Deny-Reason", line),
        ("Connection", "close"),
    ]
    return serialize(("HTTP/1.1", str(status), phrase), headers) + body
