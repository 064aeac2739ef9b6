"""What the server computes, frame by frame: with the input clock (`--clock input`), a greedy
conversation through the server (websocket, Ogg/Opus, batcher) gives the same text tokens and audio
codes, before Opus, as the official moshi server's loop on the same weights and audio, and as
offline generation with the server's frame policy; two conversations at once each get their own."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from infer_utils import NAMES, make_checkpoint
from official_utils import speech
from openmoshi.lm import generate as G
from openmoshi.lm.sampling import SamplingConfig
from openmoshi.loading.model import load_model
from openmoshi.loading.resolve import resolve_files
from openmoshi.serving.app import Runner
from openmoshi.serving.client import talk_file
from openmoshi.serving.server import MoshiServer, ServerConfig
from server_utils import listening_socket

SECONDS = 1.6  # 20 frames each


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("parity") / "model"
    make_checkpoint(path)
    return path


def official_server_loop(folder, frames: list[np.ndarray]) -> list[tuple[int, list[int]]]:
    """The official server's per-frame computation (moshi.server.ServerState.recv_loop), greedy, on
    the frames the server took in: encode, reset Mimi after the first frame, one LMGen step."""
    from moshi.models import LMGen, loaders

    info = loaders.CheckpointInfo.from_hf_repo("unused/unused", folder / NAMES["moshi_name"], folder / NAMES["mimi_name"],
                                               folder / NAMES["tokenizer_name"], folder / "config.json")
    mimi, lm = info.get_mimi(device="cpu"), info.get_moshi(device="cpu", dtype=torch.float32)
    gen = LMGen(lm, use_sampling=False)
    out = []
    with torch.no_grad(), mimi.streaming(1), gen.streaming(1):
        for i, frame in enumerate(frames):
            codes = mimi.encode(torch.from_numpy(frame)[None, None])
            if i == 0:
                mimi.reset_streaming()
            tokens = gen.step(codes[:, :, :1])
            if tokens is not None:
                out.append((int(tokens[0, 0, 0]), tokens[0, 1:, 0].tolist()))
    return out


def offline_server_policy(model, frames: list[np.ndarray]) -> list[tuple[int, list[int]]]:
    """Ours, outside the server, with its frame policy: one conversation, batch 1."""
    state = G.init_state(model.lm, 1, SamplingConfig.greedy())
    enc = model.mimi.init_encode_state(1)
    out = []
    with torch.no_grad():
        for i, frame in enumerate(frames):
            codes = model.mimi.encode_step(torch.from_numpy(frame)[None, None], enc)
            if i == 0:
                enc.reset(torch.ones(1, dtype=torch.bool))
            step = G.step(model.lm, state, codes[:, :, 0])
            if step.valid[0]:
                out.append((int(step.text[0]), step.audio[0].tolist()))
    return out


def test_server_computes_what_the_official_server_computes(folder):
    model = load_model(resolve_files(str(folder)), "cpu", torch.float32)
    pcms = [speech(SECONDS).numpy(), (0.5 * speech(SECONDS + 0.4)[2400:]).numpy()]  # two voices
    records: dict = {}

    def recorder(slot, pcm, text, audio, valid):
        frames, tokens = records.setdefault(id(slot), ([], []))
        frames.append(pcm.copy())
        if valid:
            tokens.append((int(text), audio.tolist()))

    async def main():
        server = MoshiServer(model.lm, model.mimi, model.tokenizer,
                             ServerConfig(max_sessions=2, clock="input", static_dir=None), SamplingConfig.greedy())
        server.loop.recorder = recorder
        runner, sock = Runner(server), listening_socket()
        await runner.start(sock)
        url = f"ws://127.0.0.1:{sock.getsockname()[1]}/api/chat"
        try:
            return await asyncio.gather(*(talk_file(url, pcm, tail_s=3.0) for pcm in pcms))
        finally:
            await runner.stop()

    results = asyncio.run(main())
    assert all(r.seconds_received > 1.0 for r in results)
    assert len(records) == 2
    for frames, tokens in records.values():
        assert len(frames) >= 18 and len(tokens) >= 15
        assert tokens == official_server_loop(folder, frames)[:len(tokens)]
        assert tokens == offline_server_policy(model, frames)[:len(tokens)]
    texts = [[t for t, _ in tokens] for _, tokens in records.values()]
    assert texts[0] != texts[1] and len({t for t in texts[0] + texts[1]}) > 3  # two conversations, not one
