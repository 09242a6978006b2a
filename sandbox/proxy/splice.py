"""Byte splicing for CONNECT tunnels and fixed-length bodies, with half-close and back-pressure.

On Linux the bytes never enter Python: `os.splice` moves them socket → pipe → socket inside the
kernel, driven by the asyncio loop (readiness callbacks on dup'ed fds, so the streams' transports
keep owning and closing the real ones). Elsewhere, or for TLS transports, the asyncio streams copy.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import os
import socket
import sys
from collections.abc import Iterator

STREAM_CHUNK = 256 * 1024  # the copying fallback's read size
SPLICE_CHUNK = 1024 * 1024  # most one splice call asks for
# A flow that moves bulk data grows its pipe (64 KiB by default) to this, for fewer trips through
# the loop. Only such flows: unless the proxy runs as root, pipe sizes count against the user's
# pipe-user-pages-soft (64 MiB), past which new pipes get two pages (slow, still correct).
PIPE_SIZE = 1024 * 1024
GROW_AT = 32 * 1024  # one read this big: a bulk flow
# The default (wmem_default, ~208 KiB) makes proxy and a fast reader ping-pong every ~50 KiB:
# 0.62 of direct with it, 0.84-0.96 with this (bench_proxy, sendfile origin). The kernel caps it
# at wmem_max and doubles it; only bytes the sandbox has not read yet use it (TCP's own autotuned
# send buffer goes to 4 MiB likewise).
UNIX_SNDBUF = 2 * 1024 * 1024
SPLICE_MIN = 64 * 1024  # smaller bodies: the dup/pipe set-up costs more than copying saves
_FLAGS = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)


async def close_quietly(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(Exception):
        await writer.wait_closed()


# --- can we splice? ---------------------------------------------------------------------------


@functools.cache
def available() -> bool:
    """os.splice exists and this kernel splices a stream socket through a pipe (probed once)."""
    if not sys.platform.startswith("linux") or not hasattr(os, "splice"):
        return False
    a, b = socket.socketpair()
    r, w = os.pipe()
    try:
        a.send(b"x")
        return os.splice(b.fileno(), w, 1) == 1 and os.splice(r, a.fileno(), 1) == 1
    except OSError:
        return False
    finally:
        for fd in (r, w):
            os.close(fd)
        a.close()
        b.close()


def _plain_socket(writer: asyncio.StreamWriter) -> bool:
    """An open, plain (not TLS) stream socket transport we can pause."""
    sock = writer.get_extra_info("socket")
    return (
        sock is not None
        and sock.type == socket.SOCK_STREAM
        and writer.get_extra_info("ssl_object") is None  # TLS: the socket holds ciphertext
        and not writer.transport.is_closing()
        and hasattr(writer.transport, "pause_reading")
    )


def _splicable(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    """`writer`'s socket can be spliced from, and `reader`'s buffer taken over."""
    return _plain_socket(writer) and isinstance(getattr(reader, "_buffer", None), bytearray)


# --- taking a stream over -------------------------------------------------------------------


def _take_buffered(reader: asyncio.StreamReader, limit: int | None = None) -> bytes:
    """What the StreamReader already read off the socket (at most `limit`): it goes out first.

    Private, but StreamReader has no public "give me what you hold without waiting", and its
    read() may resume the transport we just paused."""
    buf: bytearray = reader._buffer  # type: ignore[attr-defined]
    n = len(buf) if limit is None else min(limit, len(buf))
    data = bytes(buf[:n])
    del buf[:n]
    return data


async def _flush(writer: asyncio.StreamWriter) -> None:
    """Wait until the transport has sent everything it holds: our bytes must come after it."""
    transport = writer.transport
    if not transport.get_write_buffer_size():
        return
    low, high = transport.get_write_buffer_limits()
    transport.set_write_buffer_limits(high=0)  # drain() now returns only once the buffer is empty
    try:
        await writer.drain()
    finally:
        transport.set_write_buffer_limits(high=high, low=low)


@contextlib.contextmanager
def _dup(writer: asyncio.StreamWriter) -> Iterator[int]:
    """A second fd on the writer's socket: the loop refuses callbacks on an fd a transport owns,
    and the transport keeps the first one (and closes it)."""
    sock = writer.get_extra_info("socket")
    fd = os.dup(sock.fileno())
    try:
        if sock.family == socket.AF_UNIX:  # the sandbox's side (TCP tunes its own buffers)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, UNIX_SNDBUF)
        yield fd
    finally:
        os.close(fd)


@contextlib.contextmanager
def _pipe() -> Iterator[tuple[int, int]]:
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        yield r, w
    finally:
        os.close(r)
        os.close(w)


# --- moving bytes -----------------------------------------------------------------------------


class _Flow:
    """One direction, src → pipe → dst, moved by readiness callbacks: no task or future per chunk.

    `early` (bytes a StreamReader already held) goes out first. Then the flow is registered on
    src while the pipe is empty and on dst while it holds bytes dst did not take (back-pressure:
    nothing more is read until dst drains), so EAGAIN from the read always means "src has
    nothing now" and nothing is read ahead of what dst accepted. One chunk per callback, so a
    source that is never empty cannot starve the loop's other connections. `done` resolves at
    EOF or after `limit` bytes, or carries what broke (reset, EPIPE)."""

    def __init__(
        self, src: int, dst: int, pipe: tuple[int, int], *, limit: int | None, early: bytes
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._src, self._dst, (self._pipe_r, self._pipe_w) = src, dst, pipe
        self._left = limit  # None: until EOF
        self._early = memoryview(early)
        self._held = 0  # bytes in the pipe
        self._grown = False
        self.moved = 0  # spliced, not counting `early`
        self.done: asyncio.Future[None] = self._loop.create_future()
        self._on: tuple[int, bool] | None = None  # (fd, for writing) we are registered for

    def start(self) -> _Flow:
        self._step()  # bytes may be waiting already: no need for a trip through the selector
        return self

    def stop(self) -> None:
        self._watch(None, write=False)

    async def run(self) -> int:
        """Move until EOF or the limit; the bytes spliced. Raises what broke."""
        self.start()
        try:
            await self.done
        finally:
            self.stop()
        return self.moved

    def _watch(self, fd: int | None, *, write: bool) -> None:
        if self._on == (fd, write):
            return
        if self._on is not None:
            old, old_write = self._on
            (self._loop.remove_writer if old_write else self._loop.remove_reader)(old)
        self._on = None if fd is None else (fd, write)
        if fd is not None:
            (self._loop.add_writer if write else self._loop.add_reader)(fd, self._step)

    def _step(self) -> None:
        try:
            self._advance()
        except BlockingIOError:  # src has nothing now
            self._watch(self._src, write=False)
        except OSError as exc:
            self._finish(exc)

    def _advance(self) -> None:
        if (self._early or self._held) and not self._flush():
            return  # dst still full: called again once it drains
        if self._left == 0 or not self._fill():  # the limit reached, or EOF
            self._finish()
        elif not self._flush():
            return
        elif self._left == 0:  # never wait on src for bytes that are not ours
            self._finish()
        else:
            self._watch(self._src, write=False)

    def _fill(self) -> int:
        want = SPLICE_CHUNK if self._left is None else min(SPLICE_CHUNK, self._left)
        n = os.splice(self._src, self._pipe_w, want, flags=_FLAGS)
        self._held, self.moved = n, self.moved + n
        if self._left is not None:
            self._left -= n
        if n >= GROW_AT and not self._grown:
            self._grown = True
            with contextlib.suppress(OSError):  # over pipe-max-size or the user's pipe quota
                fcntl.fcntl(self._pipe_w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        return n

    def _flush(self) -> bool:
        """Send `early`, then empty the pipe, as far as dst takes; False (watching dst) if full."""
        try:
            while self._early:  # a socket: write() is send(); Python ignores SIGPIPE (EPIPE)
                self._early = self._early[os.write(self._dst, self._early) :]
            while self._held:
                self._held -= os.splice(self._pipe_r, self._dst, self._held, flags=_FLAGS)
        except BlockingIOError:
            self._watch(self._dst, write=True)
            return False
        return True

    def _finish(self, exc: BaseException | None = None) -> None:
        self._watch(None, write=False)
        if self.done.done():
            return
        if exc is None:
            self.done.set_result(None)
        else:
            self.done.set_exception(exc)


# --- CONNECT tunnels --------------------------------------------------------------------------


async def splice(
    a_r: asyncio.StreamReader,
    a_w: asyncio.StreamWriter,
    b_r: asyncio.StreamReader,
    b_w: asyncio.StreamWriter,
) -> None:
    """Relay both ways until both are done or one breaks; closes both sides."""
    try:
        if available() and _splicable(a_r, a_w) and _splicable(b_r, b_w):
            await _tunnel_kernel(a_r, a_w, b_r, b_w)
        else:
            await _tunnel_streams(a_r, a_w, b_r, b_w)
    finally:
        await close_quietly(b_w)
        await close_quietly(a_w)


def _half_close(writer: asyncio.StreamWriter) -> None:
    """Pass an EOF on; the other direction may still talk."""
    with contextlib.suppress(OSError, RuntimeError):
        if writer.can_write_eof():
            writer.write_eof()


async def _tunnel_kernel(
    a_r: asyncio.StreamReader,
    a_w: asyncio.StreamWriter,
    b_r: asyncio.StreamReader,
    b_w: asyncio.StreamWriter,
) -> None:
    await _flush(a_w)  # e.g. the "200 Connection Established" must reach the client first
    await _flush(b_w)
    if a_w.transport.is_closing() or b_w.transport.is_closing():
        return  # one side went away while we waited: nothing left to relay
    a_w.transport.pause_reading()  # type: ignore[attr-defined]
    b_w.transport.pause_reading()  # type: ignore[attr-defined]
    a_early, b_early = _take_buffered(a_r), _take_buffered(b_r)  # e.g. pipelined after CONNECT
    with _dup(a_w) as a, _dup(b_w) as b, _pipe() as ab, _pipe() as ba:
        flows = {
            _Flow(a, b, ab, limit=None, early=a_early): b_w,
            _Flow(b, a, ba, limit=None, early=b_early): a_w,
        }
        try:
            await _until_both_done({flow.start().done: dst for flow, dst in flows.items()})
        finally:
            for flow in flows:
                flow.stop()


async def _until_both_done(ends: dict[asyncio.Future[None], asyncio.StreamWriter]) -> None:
    """Each direction's EOF is passed on as it comes; the first one to break ends both."""
    while ends:
        finished, _ = await asyncio.wait(set(ends), return_when=asyncio.FIRST_COMPLETED)
        if any([fut.exception() is not None for fut in finished]):  # a list: ask every one
            return
        for fut in finished:
            _half_close(ends.pop(fut))


async def _copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    while data := await src.read(STREAM_CHUNK):
        dst.write(data)
        await dst.drain()
    _half_close(dst)


async def _tunnel_streams(
    a_r: asyncio.StreamReader,
    a_w: asyncio.StreamWriter,
    b_r: asyncio.StreamReader,
    b_w: asyncio.StreamWriter,
) -> None:
    """The portable path: asyncio streams copy through user space."""
    tasks = [asyncio.create_task(_copy(a_r, b_w)), asyncio.create_task(_copy(b_r, a_w))]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        if any(t.exception() for t in done):  # one side broke: tear both down
            for t in tasks:
                t.cancel()
    finally:
        for t in tasks:
            if not t.done():
                t.cancel()
            with contextlib.suppress(BaseException):
                await t


# --- fixed-length bodies ----------------------------------------------------------------------


async def splice_body(
    reader: asyncio.StreamReader,
    source: asyncio.StreamWriter | None,
    writer: asyncio.StreamWriter,
    n: int,
) -> int | None:
    """Relay exactly `n` bytes of `reader` (whose transport `source` writes) in the kernel.

    Returns the bytes relayed (fewer: the source hit EOF), or None, having touched nothing, where
    splicing does not apply (small body, TLS, no splice): the caller copies instead. The source
    resumes reading afterwards: a keep-alive connection goes on with its next message."""
    if n < SPLICE_MIN or source is None or not available():
        return None
    if not (_splicable(reader, source) and _plain_socket(writer)):
        return None
    await _flush(writer)
    if writer.transport.is_closing() or source.transport.is_closing():
        return None  # went away while we waited: the copying path reports it as usual
    transport = source.transport
    was_reading = transport.is_reading()  # type: ignore[attr-defined]
    transport.pause_reading()  # type: ignore[attr-defined]
    try:
        early = _take_buffered(reader, n)
        with _dup(source) as src, _dup(writer) as dst, _pipe() as pipe:
            flow = _Flow(src, dst, pipe, limit=n - len(early), early=early)
            return len(early) + await flow.run()
    finally:
        if was_reading and not transport.is_closing():
            transport.resume_reading()  # type: ignore[attr-defined]
