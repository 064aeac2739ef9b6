"""The user's words on `/v1/realtime` (`serve --stt-model`): a tiny random Kyutai STT beside a tiny
random Moshi in one process; espeak-ng speech in through the clients voice agents use; the
`conversation.item.input_audio_transcription.delta` / `.completed` events carry exactly the words
`openmoshi stt` finds in the same audio (random weights: the words themselves are compared)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

import aiohttp
import numpy as np
import pytest
import torch

from realtime_utils import (FRAME, RATE, Raw, check_responses, check_with_pipecat, models,  # noqa: F401 (fixtures)
                            pcm16_b64, realtime_url, run, speech)
from server_utils import listening_socket
from stt_utils import make_stt

from openmoshi.engine.speed import SpeedConfig, choose
from openmoshi.inference.stt import transcribe
from openmoshi.loading.model import load_model
from openmoshi.loading.resolve import resolve_files
from openmoshi.serving.app import Runner
from openmoshi.serving.hosting import ModelServers
from openmoshi.serving.server import MoshiServer, ServerConfig

DELTA = "conversation.item.input_audio_transcription.delta"
COMPLETED = "conversation.item.input_audio_transcription.completed"
pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def stt_model(tmp_path_factory):
    folder = make_stt(tmp_path_factory.mktemp("realtime_stt") / "ckpt", seed=5)
    return load_model(resolve_files(str(folder)), "cpu", torch.float32)


@contextlib.asynccontextmanager
async def hosting(models, stt_model=None, stt_sessions: int = 2, **config):
    """Moshi (and the STT model, when given) behind one app: `(moshi, stt, http_url)`."""
    config = dict(dict(max_sessions=2, static_dir=None), **config)
    moshi = MoshiServer(*models, ServerConfig(**config))
    stt = None
    if stt_model is not None:
        stt = MoshiServer.for_model(stt_model, choose("cpu", SpeedConfig(cuda_graphs=False, self_check=False)),
                                    ServerConfig(**dict(config, max_sessions=stt_sessions)))
    runner, sock = Runner(ModelServers([moshi] + ([stt] if stt else []))), listening_socket()
    await runner.start(sock)
    try:
        yield moshi, stt, f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        await runner.stop()


def heard(pcm: np.ndarray) -> np.ndarray:
    """What the server decodes of `pcm16_b64(pcm)`."""
    return np.clip(pcm * 32768, -32768, 32767).astype("<i2").astype(np.float32) / 32768.0


def expected_words(stt_model, pcm: np.ndarray, end_s: float | None = None) -> list[str]:
    """`openmoshi stt`'s words on `pcm` that start before `end_s` (default: its end): the words of
    an item that spans the whole of it."""
    end_s = pcm.size / RATE if end_s is None else end_s
    words = transcribe(stt_model, [torch.from_numpy(heard(pcm))[None]])[0].words
    return [w.text for w in words if w.start < end_s]


def transcripts(events: list[dict]) -> dict[str, tuple[str, str | None]]:
    """{item_id: (its deltas joined, its completed transcript or None)}."""
    out: dict[str, list] = {}
    for e in events:
        if e["type"] == DELTA:
            out.setdefault(e["item_id"], ["", None])[0] += e["delta"]
        elif e["type"] == COMPLETED:
            out.setdefault(e["item_id"], ["", None])[1] = e["transcript"]
    return {k: tuple(v) for k, v in out.items()}


def test_openai_sdk_transcripts_equal_openmoshi_stt(models, stt_model, speech):
    """Manual commits (turn detection off), transcription on in the GA shape: one item per commit;
    its deltas joined and its completed transcript are `openmoshi stt`'s words on that audio; the
    STT stream leaves its seat when the session ends."""
    from openai import AsyncOpenAI

    pcm = speech  # ~4 s of speech, 1.5 s of silence

    async def main():
        async with hosting(models, stt_model) as (moshi, stt, http):
            client = AsyncOpenAI(base_url=http + "/v1", api_key="anything")
            got, raw = [], []
            async with client.realtime.connect(model="gpt-realtime") as conn:
                parse = conn.parse_event
                conn.parse_event = lambda data: (raw.append(json.loads(data)), parse(data))[1]

                async def reader():
                    async for ev in conn:
                        got.append(ev)

                reading = asyncio.create_task(reader())
                await conn.session.update(session={"type": "realtime", "audio": {"input": {
                    "turn_detection": None, "transcription": {"model": "gpt-4o-transcribe", "language": "en"}}}})
                for at in range(0, pcm.size, FRAME):  # faster than real time: the STT stream keeps it all
                    await conn.input_audio_buffer.append(audio=pcm16_b64(pcm[at:at + FRAME]))
                    await asyncio.sleep(0.01)
                await conn.input_audio_buffer.commit()
                for _ in range(300):
                    if any(e.type == COMPLETED for e in got):
                        break
                    await asyncio.sleep(0.1)
                active = stt.active
                reading.cancel()
            for _ in range(100):
                if not stt.active:
                    break
                await asyncio.sleep(0.05)
            return got, raw, active, stt.active

    got, raw, active_during, active_after = run(main())
    assert [e["type"] for e in raw] == [e.type for e in got]
    check_with_pipecat(raw)
    check_responses(raw, cut_by_close=True)  # and the transcription events' own order
    updated = next(e for e in raw if e["type"] == "session.updated")
    assert "transcription" not in updated["ignored"]
    assert updated["session"]["audio"]["input"]["transcription"]["model"] == "gpt-4o-transcribe"
    committed = [e["item_id"] for e in raw if e["type"] == "input_audio_buffer.committed"]
    items = transcripts(raw)
    assert list(items) == committed
    deltas, transcript = items[committed[0]]
    words = expected_words(stt_model, pcm)
    assert len(words) >= 2
    assert deltas == transcript == " ".join(words)
    completed = next(e for e in got if e.type == COMPLETED)  # the SDK's own model of the event
    assert completed.transcript == transcript and completed.content_index == 0
    assert active_during == 1 and active_after == 0
