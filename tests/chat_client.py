"""An independent test client for `/api/chat`, written from the protocol description (not from the
server's code): it streams a tone as real-time Ogg/Opus and records what comes back."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

import aiohttp
import numpy as np
import sphn

SAMPLE_RATE, FRAME = 24000, 1920


@dataclass
class ChatResult:
    handshake: bool = False
    errors: list = field(default_factory=list)
    frames_sent: int = 0
    samples_received: int = 0
    texts: list = field(default_factory=list)
    arrivals: list = field(default_factory=list)  # monotonic time of each audio message
    close_code: int | None = None
    queue: list = field(default_factory=list)  # (position, length) of each place-in-line message
    handshake_at: float | None = None  # monotonic time of the handshake
    cut_off: bool = False  # the server closed the connection while we were still sending

    @property
    def frames_received(self) -> int:
        return self.samples_received // FRAME


def tone(n_frames: int, freq: float = 220.0) -> np.ndarray:
    t = np.arange(n_frames * FRAME) / SAMPLE_RATE
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


async def chat(url: str, seconds: float, headers=None, read_for: float | None = None,
               drain: float = 2.0, unanswered: int = 0, result: ChatResult | None = None) -> ChatResult:
    """Sends `seconds` of audio in real time; stops reading after `read_for` seconds if given.
    Then reads for up to `drain` s, until every frame sent but `unanswered` is answered. `result`:
    the ChatResult to fill, for a caller that watches it while the conversation goes on."""
    res = result if result is not None else ChatResult()
    writer, reader = sphn.OpusStreamWriter(SAMPLE_RATE), sphn.OpusStreamReader(SAMPLE_RATE)
    n = int(round(seconds / 0.08))
    pcm = tone(n)
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(url, headers=headers, max_msg_size=0) as ws:
            first = await ws.receive(timeout=10)
            while first.type == aiohttp.WSMsgType.BINARY and first.data[0] == 4:  # waiting for a slot
                meta = json.loads(first.data[1:])
                res.queue.append((meta["queue_position"], meta["queue_length"]))
                first = await ws.receive(timeout=10)
            if first.type != aiohttp.WSMsgType.BINARY:
                res.close_code = ws.close_code
                return res
            if first.data[0] == 5:
                res.errors.append(first.data[1:].decode())
                await ws.receive(timeout=5)  # the close
                res.close_code = ws.close_code
                return res
            res.handshake = first.data[:1] == b"\x00"
            start = res.handshake_at = time.monotonic()

            async def receive():
                async for msg in ws:
                    if msg.type != aiohttp.WSMsgType.BINARY:
                        break
                    kind, payload = msg.data[0], msg.data[1:]
                    if kind == 1:
                        res.samples_received += reader.append_bytes(payload).shape[-1]
                        res.arrivals.append(time.monotonic())
                    elif kind == 2:
                        res.texts.append(payload.decode())
                    elif kind == 5:
                        res.errors.append(payload.decode())
                    if read_for is not None and time.monotonic() - start > read_for:
                        await asyncio.sleep(3600)  # stop reading: the server must cope

            receiver = asyncio.create_task(receive())
            for i in range(n):
                await asyncio.sleep(max(0.0, start + i * 0.08 - time.monotonic()))
                page = writer.append_pcm(pcm[i * FRAME:(i + 1) * FRAME])
                if page:
                    try:
                        await ws.send_bytes(b"\x01" + page)
                    except ConnectionResetError:  # aiohttp's ClientConnectionResetError is one
                        res.cut_off = True  # the server closed on us (e.g. we stopped reading)
                        break
                res.frames_sent += 1
            deadline = time.monotonic() + drain
            while time.monotonic() < deadline and res.frames_received < res.frames_sent - unanswered:
                await asyncio.sleep(0.05)
            # The server sends a frame's text right after its audio: let the last one arrive too.
            await asyncio.sleep(0.2)
            receiver.cancel()
            await ws.close()
            res.close_code = ws.close_code
    return res
