"""Shared by the /v1/realtime tests: tiny models shaped like Moshi in conversation, real speech,
a raw client that records every event, and the checks of event order (realtime_order) and of
Pipecat's event models."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import time

import aiohttp
import numpy as np
import pytest
import torch

from openmoshi.lm.config import TEXT_PADDING_ID

from realtime_order import DELTAS, check_responses  # noqa: F401 (re-exported for the tests)
from server_utils import tiny_models

FRAME, RATE = 1920, 24000


# ----------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def models():
    """Tiny random models shaped like Moshi in conversation (`conversation_models`)."""
    return conversation_models()


def conversation_models(tokenizer=None):
    """Tiny random models shaped like Moshi in conversation: its text stream mostly padding (a word
    in ~1 frame of 6, so stretches of speech start and end), its audio near silence (-65 dBFS) when
    it says nothing, so that the text decides the turns as the real model's does. `tokenizer`: a
    real SentencePiece one instead of the fake (injected speech tokenizes text)."""
    torch.set_num_threads(1)
    lm, mimi, tok = tiny_models()
    tok = tokenizer or tok
    head = torch.nn.Linear(lm.text_linear.in_features, lm.text_linear.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(lm.text_linear.weight)
        head.bias.zero_()
        head.bias[TEXT_PADDING_ID] = 4.0
        last = mimi.decoder.model[-1].conv.conv
        last.weight.mul_(1e-3)
        last.bias.mul_(1e-3)
    lm.text_linear = head
    return lm, mimi, tok


@pytest.fixture(scope="module")
def speech():
    """A few seconds of real speech (espeak-ng) at 24 kHz, then 1.5 s of silence."""
    from openmoshi.audio import resample

    raw = subprocess.run(["espeak-ng", "--stdout", "-s", "150", "Hello Moshi. How are you today? "
                          "Tell me a story about the sea."], check=True, capture_output=True).stdout
    # espeak-ng writes a 44-byte WAV header, then 16-bit mono at 22050 Hz.
    pcm = np.frombuffer(raw[44:], dtype="<i2").astype(np.float32) / 32768.0
    pcm = resample(torch.from_numpy(pcm), 22050, RATE).numpy()
    return np.concatenate([pcm, np.zeros(int(1.5 * RATE), np.float32)])


def run(coro):
    return asyncio.run(coro)


def pcm16_b64(pcm: np.ndarray) -> str:
    return base64.b64encode(np.clip(pcm * 32768, -32768, 32767).astype("<i2").tobytes()).decode()


def tone(seconds: float, freq: float = 220.0) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def realtime_url(http: str, model: str = "moshi") -> str:
    return http.replace("http://", "ws://") + f"/v1/realtime?model={model}"


class Raw:
    """A websocket client written from the API's description: sends JSON events, records every
    server event with its arrival time."""

    def __init__(self, ws):
        self.ws = ws
        self.events: list[dict] = []
        self.times: list[float] = []
        self.new = asyncio.Event()
        self.reader = asyncio.create_task(self._read())

    async def _read(self):
        async for msg in self.ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                self.events.append(json.loads(msg.data))
                self.times.append(time.monotonic())
                self.new.set()

    async def send(self, **event):
        await self.ws.send_str(json.dumps(event))

    async def stream(self, pcm: np.ndarray, encode=pcm16_b64, chunk: int = FRAME):
        """Appends `pcm` in real time, one 80 ms chunk at a time."""
        start = time.monotonic()
        for i, at in enumerate(range(0, pcm.size, chunk)):
            await self.send(type="input_audio_buffer.append", audio=encode(pcm[at:at + chunk]))
            await asyncio.sleep(max(0.0, start + (i + 1) * chunk / RATE - time.monotonic()))

    async def wait_for(self, predicate, timeout: float = 10.0, start: int = 0) -> int:
        """Index of the first event from `start` on for which `predicate(event)` holds."""
        deadline = time.monotonic() + timeout
        while True:
            for i in range(start, len(self.events)):
                if predicate(self.events[i]):
                    return i
            start = len(self.events)
            self.new.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no such event within {timeout} s; got {[e['type'] for e in self.events][-20:]}")
            try:
                await asyncio.wait_for(self.new.wait(), left)
            except asyncio.TimeoutError:
                pass

    def of(self, kind: str) -> list[dict]:
        return [e for e in self.events if e["type"] == kind]


def check_with_pipecat(events: list[dict]) -> None:
    """Every event we sent parses with Pipecat's own pydantic models (an unknown type or a missing
    field ends a Pipecat session), and has a unique event_id."""
    from pipecat.services.openai.realtime.events import parse_server_event

    ids = [e["event_id"] for e in events]
    assert len(set(ids)) == len(ids)
    for e in events:
        assert parse_server_event(json.dumps(e)) is not None, f"Pipecat does not know {e['type']}"


# ----------------------------------------------------------------------------- the pieces
