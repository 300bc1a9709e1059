"""Signalling for a call on one machine: the offer and the answer cross a localhost TCP socket,
one JSON line each way. WebRTC leaves signalling to the application; this is the simplest that
lets two processes find each other without a server.
"""

from __future__ import annotations

import asyncio
import json
from typing import Awaitable, Callable

from aiortc import RTCSessionDescription

MAX_LINE = 1 << 20


class SignallingError(Exception):
    pass


def _encode(desc: RTCSessionDescription) -> bytes:
    return json.dumps({"type": desc.type, "sdp": desc.sdp}).encode() + b"\n"


def _decode(line: bytes, kind: str) -> RTCSessionDescription:
    try:
        msg = json.loads(line)
        desc = RTCSessionDescription(sdp=msg["sdp"], type=msg["type"])
    except (ValueError, KeyError, TypeError):
        raise SignallingError("malformed signalling message") from None
    if desc.type != kind:
        raise SignallingError(f"expected an {kind}, got {desc.type!r}")
    return desc


async def answer_one(host: str, port: int, answer: Callable[[RTCSessionDescription], Awaitable[RTCSessionDescription]],
                     timeout: float, listening: Callable[[int], None] | None = None) -> None:
    """Listen on host:port until one peer sends an offer; reply with ``answer(offer)``. With port 0
    the system picks one; ``listening(port)`` is told which, once the socket is ready."""
    done: asyncio.Future = asyncio.get_running_loop().create_future()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            offer = _decode(await reader.readline(), "offer")
            writer.write(_encode(await answer(offer)))
            await writer.drain()
            if not done.done():
                done.set_result(None)
        except (SignallingError, OSError) as e:
            if not done.done():
                done.set_exception(e)
        finally:
            writer.close()

    server = await asyncio.start_server(handle, host, port, limit=MAX_LINE)
    try:
        if listening is not None:
            listening(server.sockets[0].getsockname()[1])
        await asyncio.wait_for(done, timeout)
    except asyncio.TimeoutError:
        raise SignallingError(f"no caller on {host}:{port} within {timeout:.0f} s") from None
    finally:
        server.close()


async def offer_to(host: str, port: int, offer: RTCSessionDescription, timeout: float) -> RTCSessionDescription:
    """Send our offer to a peer listening on host:port, retrying until it listens -> its answer."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            reader, writer = await asyncio.open_connection(host, port, limit=MAX_LINE)
            break
        except OSError:
            if loop.time() > deadline:
                raise SignallingError(f"nobody is listening on {host}:{port} (start `imfc call recv` first)") from None
            await asyncio.sleep(0.2)
    try:
        writer.write(_encode(offer))
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), max(deadline - loop.time(), 1.0))
    except asyncio.TimeoutError:
        raise SignallingError("the receiver did not answer") from None
    finally:
        writer.close()
    return _decode(line, "answer")
