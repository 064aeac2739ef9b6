"""Personas in the batched server (issue 13), with the input clock (`--clock input`): a persona
conversation through the server is offline persona generation's and PersonaPlex's (its oracle, on
the official model), on what the client sent; a slot runs its prompt phase in the same ticks as the
others, gets its handshake after it, and the next conversation with the same persona starts from
the cached state with the same outputs; a slot in its prompt does not change what the others
produce; bad persona input is refused clearly."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
import sentencepiece
import torch

from infer_utils import MOSHI, NAMES, make_checkpoint
from official_utils import speech
from openmoshi.audio import SAMPLE_RATE, save_wav
from openmoshi.inference.offline import persona_prompt, run
from openmoshi.lm.sampling import SamplingConfig
from openmoshi.loading.model import load_model
from openmoshi.loading.resolve import resolve_files
from openmoshi.serving.app import Runner
from openmoshi.serving.client import ClientError, talk_file
from openmoshi.serving.server import MoshiServer, ServerConfig
from personaplex_oracle import converse as personaplex_converse
from personaplex_oracle import save_preset, voice_codes
from personaplex_oracle import wrap_system as personaplex_wrap
from server_utils import listening_socket, recording_encoders
from test_persona import official_models
from wire_utils import converse, decode_ogg, frames, ogg_pages

PERSONAPLEX = dict(MOSHI, dep_q=16, context=200)
SECONDS = 1.2  # 15 frames
# PersonaPlex's server (moshi/moshi/server.py, opus_loop) sends every text token as a piece but
# these: end of padding and padding.
PERSONAPLEX_HIDDEN = (0, 3)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("persona_server")
    make_checkpoint(root / "model", "moshi", seed=4, lm_kwargs=PERSONAPLEX, small_mimi=True)
    return root


@pytest.fixture(scope="module")
def official(folder):
    return official_models(folder / "model")


@pytest.fixture(scope="module")
def setup(folder, official):
    voices = folder / "voices"
    voices.mkdir()
    save_wav(voices / "ada.wav", speech(0.5)[None], SAMPLE_RATE)
    torch.save([1, 2], voices / "broken.pt")
    model = load_model(resolve_files(str(folder / "model")), "cpu", torch.float32)
    # The same voice as the preset PersonaPlex saves after its live prompt (its voice encoding, its
    # input embeddings and token cache, by the oracle).
    mimi, lm = official
    save_preset(lm, voice_codes(voices / "ada.wav", mimi), voices / "ada.pt")
    return model, voices



def serve(setup, conversations, sampling=SamplingConfig.greedy(), max_sessions=2):
    """Runs `conversations` (lists of (pcm, params), run one list after the other, the conversations
    of a list at once) through one server; returns ({id(slot): tokens}, results, server)."""
    model, voices = setup
    records: dict = {}

    def recorder(slot, pcm, text, audio, valid):
        if valid:
            records.setdefault(id(slot), []).append((int(text), audio.tolist()))

    async def main():
        server = MoshiServer(model.lm, model.mimi, model.tokenizer,
                             ServerConfig(max_sessions=max_sessions, clock="input", static_dir=None, voice_dir=voices),
                             sampling)
        server.loop.recorder = recorder
        runner, sock = Runner(server), listening_socket()
        await runner.start(sock)
        url = f"ws://127.0.0.1:{sock.getsockname()[1]}/api/chat"
        results = []
        try:
            for group in conversations:
                results.append(await asyncio.gather(*(talk_file(url, pcm, params=params, tail_s=3.0)
                                                      for pcm, params in group), return_exceptions=True))
        finally:
            await runner.stop()
        return results, server

    results, server = asyncio.run(main())
    return list(records.values()), results, server


PERSONA = {"text_prompt": "You are Ada.", "voice_prompt": "ada.wav"}


def test_a_persona_conversation_through_the_server_is_offline_and_personaplex_s(setup, official, monkeypatch):
    """A greedy persona conversation through the server (text and voice prompts and a seed as query
    parameters), on what its client sent (the client's Ogg pages, decoded here): at every frame the
    text token and codes of offline persona generation (`openmoshi infer`'s path) and of PersonaPlex's
    oracle on the official model (its steps one later: its first returns the prompt's last frame);
    the messages PersonaPlex's server sends for them; and their sound, before Opus."""
    model, voices = setup
    mimi, lm = official
    pages = ogg_pages(speech(SECONDS).numpy())
    heard = frames(decode_ogg(pages))
    text = PERSONA["text_prompt"]
    tokenizer = sentencepiece.SentencePieceProcessor(str(voices.parent / "model" / NAMES["tokenizer_name"]))
    oracle, _ = personaplex_converse(lm, mimi, voice_codes(voices / "ada.wav", mimi),
                                     tokenizer.encode(personaplex_wrap(text)), heard)
    offline = run(model, [np.concatenate(heard)], SamplingConfig.greedy(),
                  prompt=persona_prompt(model, text, voices / "ada.wav"), cuda_graph=False)[0]
    ticks = []

    def recorder(seat, pcm, text, audio, valid):
        ticks.append((int(text), audio.tolist(), bool(valid)))

    async def main():
        server = MoshiServer(model.lm, model.mimi, model.tokenizer,
                             ServerConfig(max_sessions=1, clock="input", static_dir=None, voice_dir=voices),
                             SamplingConfig.greedy())
        server.loop.recorder = recorder
        runner, sock = Runner(server), listening_socket()
        await runner.start(sock)
        try:
            return await converse(f"ws://127.0.0.1:{sock.getsockname()[1]}/api/chat", pages, len(heard),
                                  dict(PERSONA, seed=7))
        finally:
            await runner.stop()

    encoders = recording_encoders(monkeypatch)
    wire = asyncio.run(main())
    assert wire.handshake and not wire.errors
    computed = [(text, codes) for text, codes, valid in ticks if valid]
    assert len(ticks) == len(computed) == len(heard) == 15  # every frame answered, from the first
    assert computed[:-1] == oracle[1:] and len({t for t, _ in computed}) > 3
    assert [text for text, _ in computed] == offline.text_tokens
    expected = []
    for token in offline.text_tokens:
        expected += ["audio"] + ([] if token in PERSONAPLEX_HIDDEN else [tokenizer.id_to_piece(token).replace("\u2581", " ")])
    assert wire.kinds == expected
    (encoder,) = encoders
    assert encoder.pages == wire.audio
    want = offline.audio[0].numpy().reshape(len(heard), -1)
    assert np.abs(np.stack(encoder.pcm) - want).max() < 1e-4 * np.abs(want).max()


@pytest.mark.parametrize("seeded", [False, True])
def test_cached_persona_state_gives_the_live_prompts_conversation(setup, seeded):
    pcm = speech(SECONDS).numpy()
    params = dict(PERSONA, seed=11) if seeded else PERSONA
    sampling = SamplingConfig(temp=0.8, temp_text=0.7, top_k=50, top_k_text=10) if seeded else SamplingConfig.greedy()
    tokens, results, server = serve(setup, [[(pcm, params)], [(pcm, params)]], sampling)
    assert server.loop.prompts.hits == 1 and len(server.loop.prompts.cache) == 1
    n = min(len(t) for t in tokens)  # frames the server took in before each client hung up
    assert len(tokens) == 2 and n >= 12
    assert tokens[0][:n] == tokens[1][:n]
    # The persona changed the conversation: without it the model says something else.
    plain, _, _ = serve(setup, [[(pcm, {"seed": 11} if seeded else {})]], sampling)
    assert plain[0][:len(tokens[0])] != tokens[0][:len(plain[0])]


def test_a_voice_preset_gives_the_audio_voices_conversation(setup):
    """The preset (replayed input embeddings, then its token cache, in the batcher's ticks) and
    the audio file it was made from give the same conversation."""
    pcm = speech(SECONDS).numpy()
    tokens, results, server = serve(setup, [[(pcm, PERSONA)], [(pcm, dict(PERSONA, voice_prompt="ada.pt"))]])
    assert server.loop.prompts.hits == 0 and len(server.loop.prompts.cache) == 2
    n = min(len(t) for t in tokens)
    assert len(tokens) == 2 and n >= 12
    assert tokens[0][:n] == tokens[1][:n]


def test_a_slot_in_its_prompt_does_not_change_the_others(setup):
    """B alone, then B while A joins and runs its prompt (and talks) in the same ticks: B's tokens
    are the same, sampled with its seeds."""
    b_pcm, a_pcm = speech(SECONDS).numpy(), (0.5 * speech(SECONDS + 0.4)[2400:]).numpy()
    sampling = SamplingConfig(temp=0.8, temp_text=0.7, top_k=50, top_k_text=10)
    b_params = {"text_seed": 5, "audio_seed": 6}
    alone, _, _ = serve(setup, [[(b_pcm, b_params)]], sampling)
    together, results, server = serve(setup, [[(b_pcm, b_params), (a_pcm, dict(PERSONA, seed=3))]], sampling)
    assert not any(isinstance(r, Exception) for r in results[0]), results
    assert server.loop.prompts.hits == 0 and len(together) == 2
    n = min(len(t) for t in (*alone, *together))
    assert n >= 12
    assert any(alone[0][:n] == t[:n] for t in together)


def test_bad_persona_input_is_refused_and_the_server_goes_on(setup):
    pcm = speech(0.5).numpy()
    bad = [({"voice_prompt": "nobody.wav"}, "unknown voice 'nobody.wav'; the voices are: ada.pt, ada.wav, broken.pt"),
           ({"voice_prompt": "broken.pt"}, "broken.pt is not a PersonaPlex preset"),
           ({"voice_prompt": "../model/config.json"}, "unknown voice"),
           ({"text_prompt": "  "}, "the text prompt is empty"),
           ({"text_prompt": "hello " * 200}, "more than the 100 the context window leaves")]
    _, results, _ = serve(setup, [[(pcm, params) for params, _ in bad], [(pcm, PERSONA)]])
    for (params, message), result in zip(bad, results[0]):
        assert isinstance(result, ClientError) and "bad request" in str(result) and message in str(result), (params, result)
    assert not isinstance(results[1][0], Exception), results[1][0]
    assert results[1][0].seconds_received > 0.2  # a good conversation after them


def test_voices_route_and_persona_time_saved(setup):
    """GET /api/voices lists the folder; the handshake of a cached persona comes sooner than the
    live prompt's (printed: the time the cache saves on this machine)."""
    import aiohttp

    model, voices = setup

    async def main():
        server = MoshiServer(model.lm, model.mimi, model.tokenizer,
                             ServerConfig(max_sessions=1, clock="input", static_dir=None, voice_dir=voices),
                             SamplingConfig.greedy())
        runner, sock = Runner(server), listening_socket()
        await runner.start(sock)
        base = f"127.0.0.1:{sock.getsockname()[1]}"
        await asyncio.to_thread(server.personas._voice, "ada.wav")  # time the prompt, not the voice's encoding
        waits, steps = [], []
        try:
            async with aiohttp.ClientSession() as session:
                async with session.get(f"http://{base}/api/voices") as r:
                    listed = await r.json()
                for _ in range(2):
                    while server.seats.taken:  # the first conversation's seat is freed once its session ended
                        await asyncio.sleep(0.01)
                    start = time.monotonic()
                    url = f"ws://{base}/api/chat?text_prompt=You%20are%20Ada.&voice_prompt=ada.wav"
                    async with session.ws_connect(url) as ws:
                        msg = await ws.receive(timeout=60)
                        waits.append(time.monotonic() - start)
                        assert msg.data[:1] == b"\x00"
                        # The handshake came after the whole prompt phase had run in the model loop.
                        row = next(r for r in server.loop.rows if r is not None)
                        steps.append((row.steps, row.cursor, row.join.prompt.frames))
        finally:
            await runner.stop()
        return listed, waits, steps, server

    listed, waits, steps, server = asyncio.run(main())
    assert all(n >= frames and cursor is None for n, cursor, frames in steps), steps
    assert listed == {"voices": ["ada.pt", "ada.wav", "broken.pt"]}
    assert server.loop.prompts.hits == 1  # the second started from the cache (its time is printed, not tested)
    frames = server.loop.prompts.cache[next(iter(server.loop.prompts.cache))].temporal.offset.item() + 1
    print(f"persona handshake: live prompt ({frames} frames) {waits[0]:.3f} s, cached {waits[1]:.3f} s")


def test_web_ui_persona_params_agree():
    """The web UI sends the persona's parameters under the names the server reads, and asks the
    voices route the server serves."""
    import re
    from pathlib import Path

    from openmoshi.serving import personas

    web = Path(personas.__file__).parent / "web"
    js = (web / "protocol.js").read_text()
    names = re.findall(r'"(\w+)"', re.search(r"export const PERSONA_PARAMS = \[(.*?)\];", js).group(1))
    assert tuple(names) == personas.PERSONA_PARAMS
    assert re.search(r'export const VOICES_ROUTE = "([\w/]+)";', js).group(1) == personas.VOICES_ROUTE.lstrip("/")
    html = (web / "index.html").read_text()
    assert all(f'name="{n}"' in html for n in names)


def test_realtime_instructions_and_voice_become_the_persona(setup):
    """/v1/realtime on a PersonaPlex model: session.update's `instructions` and `voice` are its text
    and voice prompts (not ignored); the slot runs the prompt phase, the next session with the same
    persona starts from the cache, and an unknown voice is an error event, the session going on."""
    import json

    import aiohttp

    from openmoshi.lm.persona import wrap_system

    model, voices = setup
    update = {"type": "session.update", "session": {"type": "realtime", "instructions": "You are Ada.",
                                                      "audio": {"output": {"voice": "ada.wav"}}}}

    async def session(url, events, server, bad_first=False, cached=False):
        async with aiohttp.ClientSession() as s, s.ws_connect(url) as ws:
            async def next_of(kind):
                while True:
                    msg = await ws.receive(timeout=30)
                    ev = json.loads(msg.data)
                    events.append(ev)
                    if ev["type"] in (kind, "error"):
                        return ev
            await next_of("session.created")
            if bad_first:
                await ws.send_str(json.dumps({"type": "session.update", "session": {
                    "audio": {"output": {"voice": "nobody.wav"}}}}))
                assert (await next_of("session.updated"))["type"] == "error"
            hits = server.loop.prompts.hits  # before the update: its prompt may start from the cache at once
            await ws.send_str(json.dumps(update))
            updated = await next_of("session.updated")
            conv = next(iter(server.sessions))
            for _ in range(400):  # the first runs the prompt phase and caches its state; the second uses it
                if (server.loop.prompts.hits > hits if cached else conv.join.persona in server.loop.prompts.cache):
                    break
                await asyncio.sleep(0.05)
            return updated, conv.join.persona

    async def main():
        server = MoshiServer(model.lm, model.mimi, model.tokenizer,
                             ServerConfig(max_sessions=1, static_dir=None, voice_dir=voices), SamplingConfig.greedy())
        runner, sock = Runner(server), listening_socket()
        await runner.start(sock)
        url = f"ws://127.0.0.1:{sock.getsockname()[1]}/v1/realtime?model=personaplex"
        first_events, second_events = [], []
        try:
            first = await session(url, first_events, server, bad_first=True)
            hits_before = server.loop.prompts.hits
            while server.sessions:
                await asyncio.sleep(0.05)
            second = await session(url, second_events, server, cached=True)
            return first, second, hits_before, server.loop.prompts.hits, first_events
        finally:
            await runner.stop()

    (updated, key), (_, key2), hits_before, hits_after, events = asyncio.run(main())
    assert updated["type"] == "session.updated"
    assert "instructions" not in updated["ignored"] and "voice" not in updated["ignored"]
    assert updated["session"]["instructions"] == "You are Ada."
    assert updated["session"]["audio"]["output"]["voice"] == "ada.wav"
    assert key[0] == "ada.wav" and key[2] == wrap_system("You are Ada.") and key2 == key
    assert hits_after == hits_before + 1  # the second session started from the cached persona
    error = next(e for e in events if e["type"] == "error")
    assert error["error"]["code"] == "invalid_value" and "nobody.wav" in error["error"]["message"]
