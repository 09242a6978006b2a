"""Byte splicing for CONNECT tunnels, with half-close and back-pressure."""

from __future__ import annotations

import asyncio
import contextlib

from sandbox.proxy.forward import close_quietly
from sandbox.proxy.http1 import CHUNK


async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    while data := await src.read(CHUNK):
        dst.write(data)
        await dst.drain()
    if dst.can_write_eof():  # pass the half-close on; the other direction may still talk
        dst.write_eof()


async def splice(
    a_r: asyncio.StreamReader,
    a_w: asyncio.StreamWriter,
    b_r: asyncio.StreamReader,
    b_w: asyncio.StreamWriter,
) -> None:
    tasks = [asyncio.create_task(_pipe(a_r, b_w)), asyncio.create_task(_pipe(b_r, a_w))]
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
        await close_quietly(b_w)
        await close_quietly(a_w)
