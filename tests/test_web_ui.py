"""The web UI in a real browser: headless Chromium (the Debian package) driven by playwright, its
microphone fed from a wav of speech, against the protocol stub and against the real server with a
tiny random model. Checks that audio reached the server, came back and played, and that text
appeared; saves screenshots under tests/artifacts/.

Needs `apt-get install chromium espeak-ng sox` and `pip install playwright` (no browser download:
the Debian chromium is used); skipped otherwise."""

import re
import shutil
import subprocess
import time
import wave
from pathlib import Path

import numpy as np
import pytest

from chat_stub import AppServer, ChatStub, StubServer

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
SPEECH = "Hello Moshi, how are you today? I would like to talk about the weather in Paris."

if not Path(CHROMIUM).exists():
    pytest.skip(f"{CHROMIUM} not found (apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is missing (pip install playwright)")
for tool in ("espeak-ng", "sox"):
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} not found (apt-get install {tool})", allow_module_level=True)


@pytest.fixture(scope="module")
def speech_wav(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("speech")
    raw, wav = folder / "raw.wav", folder / "speech.wav"
    subprocess.run(["espeak-ng", "-w", str(raw), SPEECH], check=True)
    subprocess.run(["sox", str(raw), "-r", "48000", "-c", "1", "-b", "16", str(wav)], check=True)
    return wav


@pytest.fixture(scope="module")
def browser(speech_wav):
    flags = ["--no-sandbox", "--disable-gpu", "--use-fake-ui-for-media-stream",
             "--use-fake-device-for-media-stream", f"--use-file-for-fake-audio-capture={speech_wav}",
             "--autoplay-policy=no-user-gesture-required", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=flags)
        yield b
        b.close()


def _converse(browser, url: str, seconds_played: float, timeout: float, latency_chunks: int = 0):
    """Opens the UI, connects, waits until `seconds_played` of the server's audio has played, some
    text arrived (and the latency shown counts `latency_chunks` and has a heard value); returns
    (page, stats, page errors)."""
    page = browser.new_page(viewport={"width": 1280, "height": 800}, accept_downloads=True)
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url)
    page.click("#connect")
    deadline = time.monotonic() + timeout
    stats = None
    while time.monotonic() < deadline:
        page.wait_for_timeout(250)
        stats = page.evaluate("window.openmoshi.stats")
        if stats["state"] in ("error", "closed") or (
                stats["audioPlayedS"] >= seconds_played and stats["textPieces"] > 0
                and stats["latencyChunks"] >= latency_chunks
                and (latency_chunks == 0 or stats["heardP50Ms"] is not None)):
            break
    return page, stats, errors


def _check_conversation(page, stats, errors, seconds_played):
    assert not errors, errors
    assert stats["state"] == "connected", (stats, page.inner_text("#error"))
    assert stats["audioSentS"] > 1.0  # the microphone was encoded and sent
    assert stats["audioPlayedS"] >= seconds_played  # the reply was decoded and went to the speaker
    assert stats["textPieces"] > 0 and page.inner_text("#transcript").strip()
    assert stats["decodeErrors"] == 0


def test_browser_conversation_with_stub(browser):
    """Against the echo stub: the mic reaches the server, the echo plays, the recording has both voices."""
    with StubServer() as server:
        page, stats, errors = _converse(browser, server.url, 2.0, timeout=20)
        log = server.stub.log
        _check_conversation(page, stats, errors, 2.0)
        assert log.samples_in >= 24000 and log.peak_in > 0.05  # speech, not silence, got there
        assert log.query[0]["text_temperature"] == "0.7"
        page.click("#disconnect")
        with page.expect_download() as download:
            page.click("#download")
        path = download.value.path()
    with wave.open(str(path)) as w:
        assert w.getnchannels() == 2 and w.getframerate() == 24000
        pcm = np.frombuffer(w.readframes(w.getnframes()), "<i2").reshape(-1, 2) / 32768
    assert len(pcm) >= 2 * 24000
    assert np.abs(pcm[:, 0]).max() > 0.05 and np.abs(pcm[:, 1]).max() > 0.05  # you, and the echo
    page.close()


@pytest.mark.slow
def test_browser_conversation_with_server(browser):
    """Against `openmoshi serve`'s app with a tiny random model; screenshot for a human to look at."""
    from openmoshi.serving.server import MoshiServer, ServerConfig

    from server_utils import tiny_models

    moshi = MoshiServer(*tiny_models(), ServerConfig(max_sessions=2))
    peaks = []
    push = moshi.loop.push

    def spy(slot, pcm):  # what the server decoded from the browser's Ogg/Opus
        peaks.append(float(np.abs(pcm).max()) if len(pcm) else 0.0)
        return push(slot, pcm)

    moshi.loop.push = spy
    with AppServer(moshi) as server:
        page, stats, errors = _converse(browser, server.url, 1.5, timeout=60, latency_chunks=5)
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "web_ui.png"), full_page=True)
        _check_conversation(page, stats, errors, 1.5)
        assert len(peaks) >= 10 and max(peaks) > 0.05
        # The latency the page measured: after the model's step, and no longer than the conversation
        # (a loaded 2-core machine may not keep real time with even the tiny model: no tighter bound).
        assert 0 < stats["latencyP50Ms"] <= stats["latencyP90Ms"] < 1000 * stats["audioSentS"] + 1000, stats
        assert stats["heardP50Ms"] is None or stats["heardP50Ms"] > stats["latencyP50Ms"], stats
        page.click("#disconnect")
        page.close()


def test_browser_shows_the_latency_it_measures(browser):
    """Against a stub that answers like a model (frame k once frame k + 1 is in) 100 ms late, the
    page measures those 100 ms plus the network, and as heard adds its jitter buffer's hold (20 ms
    at first), the rest of the 80 ms frame after its first sample, and the audio output's delay."""
    with StubServer(ChatStub(lag_frames=1, answer_after_s=0.1)) as server:
        page, stats, errors = _converse(browser, server.url, 1.5, timeout=30, latency_chunks=10)
        _check_conversation(page, stats, errors, 1.5)
        table = page.inner_text("#stats")
        page.click("#disconnect")
        page.close()
    assert 100 <= stats["latencyP50Ms"] <= stats["latencyP90Ms"] < 100 + 300, stats
    out = stats["outputLatencyMs"]
    assert 0 <= out < 500 and stats["bufferTargetMs"] >= 20, stats
    heard_extra = stats["heardP50Ms"] - stats["latencyP50Ms"] - out
    assert 20 + 80 - 10 <= heard_extra < 320 + 80, stats
    for label in ("Latency p50 / p90 (10 s)", "As heard p50 / p90"):  # shown to the user, as numbers
        assert re.search(re.escape(label) + r"\s+-?\d+ / -?\d+ ms", table), table
    assert re.search(r"Jitter buffer target\s+\d+ ms", table), table


def test_browser_shows_busy_server(browser):
    from chat_stub import ChatStub

    with StubServer(ChatStub(busy=True)) as server:
        page = browser.new_page()
        page.goto(server.url)
        page.click("#connect")
        page.wait_for_function("document.body.dataset.state === 'error'", timeout=10000)
        assert "busy" in page.inner_text("#error")
        assert page.is_enabled("#connect")
        page.close()


def test_browser_waits_for_a_slot(browser):
    """A busy server's place-in-line messages show as the status, then the conversation starts."""
    from chat_stub import ChatStub

    with StubServer(ChatStub(queue=2, queue_interval=1.0)) as server:
        page = browser.new_page()
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(server.url)
        page.click("#connect")
        page.wait_for_function("document.body.dataset.state === 'waiting'", timeout=10000)
        assert page.inner_text("#status") == "Waiting for a free slot: position 2 of 2"
        page.wait_for_function("document.getElementById('status').textContent.endsWith('position 1 of 1')",
                               timeout=10000)
        page.wait_for_function("document.body.dataset.state === 'connected'", timeout=10000)
        page.wait_for_function("window.openmoshi.stats.audioSentS > 0.3", timeout=10000)
        assert not errors and page.inner_text("#error") == ""
        page.click("#disconnect")
        page.close()
