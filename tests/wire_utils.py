"""The wire of `/api/chat` seen from the client, for parity tests: the Ogg/Opus pages a client sends
(made here with sphn before connecting, so the test knows them byte for byte) and every message it
gets back, in order. Written from the protocol (a kind byte, then the payload: 0 handshake, 1 audio,
2 text, 4 metadata, 5 error), not from the server's or our client's code.

    pages = ogg_pages(pcm)                       # one page per 1920-sample frame, as the clients send
    heard = frames(decode_ogg(pages))            # what a server must hear, decoded here on its own
    wire = await converse(url, pages, expect_audio=n)
    wire.audio, wire.texts, wire.kinds           # what the server sent
"""

from __future__ import annotations

import asyncio
import time
import urllib.parse
from dataclasses import dataclass, field

import aiohttp
import numpy as np
import sphn

SAMPLE_RATE, FRAME = 24000, 1920
HANDSHAKE, AUDIO, TEXT, METADATA, ERROR = 0, 1, 2, 4, 5


def ogg_pages(pcm: np.ndarray) -> list[bytes]:
    """float32 [N] -> the Ogg pages of a fresh sphn Opus writer, one per 1920-sample frame (the
    last frame zero-padded); sphn writes a page for every frame it is given."""
    pcm = np.asarray(pcm, np.float32).reshape(-1)
    n = -(-len(pcm) // FRAME)
    padded = np.zeros(n * FRAME, np.float32)
    padded[:len(pcm)] = pcm
    writer = sphn.OpusStreamWriter(SAMPLE_RATE)
    pages = [bytes(writer.append_pcm(padded[i * FRAME:(i + 1) * FRAME])) for i in range(n)]
    assert all(pages), "sphn held a frame back: a page per frame is what this helper assumes"
    return pages


def decode_ogg(pages: list[bytes]) -> np.ndarray:
    """The PCM of an Ogg/Opus byte stream, decoded by a fresh sphn reader."""
    reader = sphn.OpusStreamReader(SAMPLE_RATE)
    pcm = reader.append_bytes(b"".join(pages))
    return np.asarray(pcm, np.float32).reshape(-1)


def frames(pcm: np.ndarray) -> list[np.ndarray]:
    """Whole 1920-sample frames (a partial last one is not a frame)."""
    return [pcm[i:i + FRAME].copy() for i in range(0, len(pcm) - FRAME + 1, FRAME)]


@dataclass
class Wire:
    sent: list[bytes] = field(default_factory=list)  # Ogg pages, in the order sent
    received: list[tuple[int, bytes]] = field(default_factory=list)  # after the handshake, in order
    handshake: bool = False

    @property
    def audio(self) -> list[bytes]:
        return [payload for kind, payload in self.received if kind == AUDIO]

    @property
    def texts(self) -> list[str]:
        return [payload.decode() for kind, payload in self.received if kind == TEXT]

    @property
    def errors(self) -> list[str]:
        return [payload.decode() for kind, payload in self.received if kind == ERROR]

    @property
    def kinds(self) -> list:
        """The messages in order: "audio" for audio, the piece itself for text, (kind,) otherwise."""
        return ["audio" if k == AUDIO else payload.decode() if k == TEXT else (k,) for k, payload in self.received]


async def converse(url: str, pages: list[bytes], expect_audio: int, params: dict | None = None,
                   together: asyncio.Barrier | None = None, grace: float = 0.3, timeout: float = 30.0) -> Wire:
    """Connects, waits for the handshake (and, with `together`, for the other conversations' too),
    sends every page as an audio message, reads until `expect_audio` audio messages came back (or
    `timeout`), then `grace` seconds more, so that a message too many is seen; hangs up."""
    wire = Wire()
    query = urllib.parse.urlencode(params or {})
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"{url}?{query}" if query else url, max_msg_size=0) as ws:
            while True:  # place-in-line metadata may come first
                msg = await ws.receive(timeout=timeout)
                if msg.type != aiohttp.WSMsgType.BINARY:
                    return wire
                kind, payload = msg.data[0], bytes(msg.data[1:])
                if kind == HANDSHAKE:
                    wire.handshake = True
                    break
                wire.received.append((kind, payload))
                if kind == ERROR:
                    return wire
            if together is not None:
                await together.wait()
            got = asyncio.Event()

            async def receive():
                async for msg in ws:
                    if msg.type != aiohttp.WSMsgType.BINARY:
                        break
                    wire.received.append((msg.data[0], bytes(msg.data[1:])))
                    if len(wire.audio) >= expect_audio:
                        got.set()

            receiver = asyncio.create_task(receive())
            for page in pages:
                await ws.send_bytes(bytes([AUDIO]) + page)
                wire.sent.append(page)
                await asyncio.sleep(0)  # let the reader run between sends
            deadline = time.monotonic() + timeout
            try:
                await asyncio.wait_for(got.wait(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                pass  # the test's assertions say what is missing
            await asyncio.sleep(grace)
            receiver.cancel()
    return wire
