"""The server against the official one, on the wire: with the input clock (`--clock input`), two
greedy conversations at once through the server (websocket, Ogg/Opus, batcher) get the messages the
official moshi server's loop would send for the audio their clients sent: the same text pieces in
the same places, an audio message for each frame it answers with the same sound, and, before Opus,
the same text tokens and audio codes, also the same as offline generation with the server's
frame policy.

What the server heard is not taken from the server: each client's own Ogg pages are decoded here
with a fresh sphn reader and cut into 1920-sample frames, so a dropped, duplicated or mis-decoded
input frame shows as other tokens."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import sentencepiece
import torch

from infer_utils import NAMES, make_checkpoint
from official_utils import speech
from openmoshi.lm import generate as G
from openmoshi.lm.sampling import SamplingConfig
from openmoshi.loading.model import load_model
from openmoshi.loading.resolve import resolve_files
from openmoshi.serving.app import Runner
from openmoshi.serving.server import MoshiServer, ServerConfig
from server_utils import listening_socket, recording_encoders
from wire_utils import converse, decode_ogg, frames, ogg_pages

# The official server (moshi/server.py, decode_and_send) shows every text token but these two:
# end of padding and padding; a piece is SentencePiece's with its word marker made a space.
OFFICIAL_HIDDEN = (0, 3)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("parity") / "model"
    make_checkpoint(path, small_mimi=True)
    return path


@pytest.fixture(scope="module")
def official(folder):
    from moshi.models import loaders

    info = loaders.CheckpointInfo.from_hf_repo("unused/unused", folder / NAMES["moshi_name"], folder / NAMES["mimi_name"],
                                               folder / NAMES["tokenizer_name"], folder / "config.json",
                                               mimi_config_path=folder / "mimi.json")
    return info.get_mimi(device="cpu"), info.get_moshi(device="cpu", dtype=torch.float32)


def official_server_loop(official, heard: list[np.ndarray]):
    """The official server's per-frame work (moshi.server.ServerState.recv_loop and decode_and_send),
    greedy: encode, reset Mimi after the first frame, one LMGen step, and for each frame it returns
    the Mimi decoding of its audio codes. ([(text, codes)], [pcm [1920]]), one per answered frame."""
    from moshi.models import LMGen

    mimi, lm = official
    gen = LMGen(lm, use_sampling=False)
    tokens, pcm = [], []
    with torch.no_grad(), mimi.streaming(1), gen.streaming(1):
        for i, frame in enumerate(heard):
            codes = mimi.encode(torch.from_numpy(frame)[None, None])
            if i == 0:
                mimi.reset_streaming()
            out = gen.step(codes[:, :, :1])
            if out is not None:
                tokens.append((int(out[0, 0, 0]), out[0, 1:, 0].tolist()))
                pcm.append(mimi.decode(out[:, 1:])[0, 0].numpy())
    return tokens, pcm


def official_messages(tokens, tokenizer) -> list:
    """The messages the official server sends for these frames: per frame its audio, then its text
    piece unless hidden (as `Wire.kinds` lists them)."""
    out = []
    for text, _ in tokens:
        out.append("audio")
        if text not in OFFICIAL_HIDDEN:
            out.append(tokenizer.id_to_piece(text).replace("\u2581", " "))
    return out


def offline_server_policy(model, heard: list[np.ndarray]) -> list[tuple[int, list[int]]]:
    """Ours, outside the server, with its frame policy: one conversation, batch 1."""
    state = G.init_state(model.lm, 1, SamplingConfig.greedy())
    enc = model.mimi.init_encode_state(1)
    out = []
    with torch.no_grad():
        for i, frame in enumerate(heard):
            codes = model.mimi.encode_step(torch.from_numpy(frame)[None, None], enc)
            if i == 0:
                enc.reset(torch.ones(1, dtype=torch.bool))
            step = G.step(model.lm, state, codes[:, :, 0])
            if step.valid[0]:
                out.append((int(step.text[0]), step.audio[0].tolist()))
    return out


def serve(model, conversations, monkeypatch):
    """Runs the conversations [(pages, expected audio messages, params)] at once (each starts
    sending once all have their handshake); returns (wires, {seeds: [(text, codes, valid)]}, the
    conversations' Opus encoders)."""
    ticks: dict = {}
    servers = []

    def recorder(seat, pcm, text, audio, valid):  # the seeds tell whose seat it is
        seeds = servers[0].seats.taken[seat].join.seeds
        ticks.setdefault(seeds, []).append((int(text), audio.tolist(), bool(valid)))

    async def main():
        server = MoshiServer(model.lm, model.mimi, model.tokenizer,
                             ServerConfig(max_sessions=2, clock="input", static_dir=None), SamplingConfig.greedy())
        servers.append(server)
        server.loop.recorder = recorder
        runner, sock = Runner(server), listening_socket()
        await runner.start(sock)
        url = f"ws://127.0.0.1:{sock.getsockname()[1]}/api/chat"
        together = asyncio.Barrier(len(conversations))
        try:
            return await asyncio.gather(*(converse(url, pages, n, params, together)
                                          for pages, n, params in conversations))
        finally:
            await runner.stop()

    encoders = recording_encoders(monkeypatch)
    return asyncio.run(main()), ticks, encoders


def test_server_sends_what_the_official_server_sends(folder, official, monkeypatch):
    model = load_model(resolve_files(str(folder)), "cpu", torch.float32)
    tokenizer = sentencepiece.SentencePieceProcessor(str(folder / NAMES["tokenizer_name"]))
    pcms = [speech(1.6).numpy(), (0.5 * speech(2.0)[2400:]).numpy()]  # two voices, 20 and 24 frames
    pages = [ogg_pages(p) for p in pcms]
    heard = [frames(decode_ogg(p)) for p in pages]
    assert [len(h) for h in heard] == [len(p) for p in pages] == [20, 24]
    expected = [official_server_loop(official, h) for h in heard]
    seeds = [(101, 201), (102, 202)]  # greedy: they only tell the conversations apart in the recorder
    wires, ticks, encoders = serve(model, [(p, len(tokens), {"text_seed": s[0], "audio_seed": s[1]})
                                 for p, (tokens, _), s in zip(pages, expected, seeds)], monkeypatch)
    for wire, h, (tokens, pcm), s in zip(wires, heard, expected, seeds):
        assert wire.handshake and not wire.errors
        # As many steps as the client sent frames (the tokens below say each frame was its own).
        assert len(ticks[s]) == len(h)
        computed = [(text, codes) for text, codes, valid in ticks[s] if valid]
        assert len(tokens) >= 18 and len({t for t, _ in tokens}) > 3
        assert computed == tokens
        assert computed == offline_server_policy(model, h)
        # Sent: per answered frame, its audio message, then its text piece (ids 0 and 3 hidden).
        assert wire.kinds == official_messages(tokens, tokenizer)
        # The sound of each audio message: the official decoding of that frame, made Opus by the
        # conversation's encoder (Opus is lossy: its output is compared before it, and the bytes
        # the client got with what the encoder made of it).
        encoder = next(e for e in encoders if e.pages and e.pages[0] == wire.audio[0])
        assert encoder.pages == wire.audio and len(decode_ogg(wire.audio)) == len(tokens) * 1920
        assert np.abs(np.stack(encoder.pcm) - np.stack(pcm)).max() < 1e-4 * np.abs(pcm).max()
    assert [t for t, _ in expected[0][0]] != [t for t, _ in expected[1][0]]  # two conversations, not one
