"""openmoshi.audio: resampling against analytic signals, loading every common format, error paths,
and WAV writing. Files are made in the test (espeak-ng speech, sines) and encoded with PyAV or sox;
the reference they are compared with is read with Python's `wave` module, not with PyAV."""

from __future__ import annotations

import math
import shutil
import struct
import subprocess
import wave

import av
import numpy as np
import pytest
import torch

from openmoshi import audio
from openmoshi.audio import SAMPLE_RATE, AudioError, load_audio, resample, save_wav

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng")
needs_sox = pytest.mark.skipif(shutil.which("sox") is None, reason="needs sox")


def sine(freq: float, rate: int, n: int, amplitude: float = 0.5) -> np.ndarray:
    return (amplitude * np.sin(2 * math.pi * freq * np.arange(n) / rate)).astype(np.float64)


def read_wav(path) -> tuple[np.ndarray, int]:
    """16-bit PCM wav -> float [C, N] and its rate, with the standard library only."""
    with wave.open(str(path), "rb") as f:
        assert f.getsampwidth() == 2
        channels, rate = f.getnchannels(), f.getframerate()
        data = np.frombuffer(f.readframes(f.getnframes()), dtype="<i2")
    return data.reshape(-1, channels).T.astype(np.float64) / 32768.0, rate


def write_wav16(path, pcm: np.ndarray, rate: int) -> None:
    """float [C, N] -> 16-bit PCM wav, with the standard library only."""
    pcm = np.atleast_2d(pcm)
    with wave.open(str(path), "wb") as f:
        f.setnchannels(pcm.shape[0])
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes(np.round(pcm.T * 32767).astype("<i2").tobytes())


def encode(path, pcm: np.ndarray, rate: int, codec: str, container_format: str | None = None):
    """Encode float [C, N] (C = 1 or 2) with PyAV; skips the test if this FFmpeg lacks `codec`."""
    if codec not in av.codecs_available:
        pytest.skip(f"this FFmpeg has no {codec} encoder")
    layout = {1: "mono", 2: "stereo"}[pcm.shape[0]]
    with av.open(str(path), "w", format=container_format) as container:
        stream = container.add_stream(codec, rate=rate, layout=layout)
        to_codec = av.AudioResampler(format=stream.codec_context.codec.audio_formats[0].name,
                                     layout=layout, rate=rate)  # format conversion only
        packed = np.ascontiguousarray(pcm.T.astype(np.float32)).reshape(1, -1)  # [1, N * C]
        frames = [av.AudioFrame.from_ndarray(packed, format="flt", layout=layout), None]
        frames[0].sample_rate = rate
        frames[0].pts = 0  # timestamps let the muxer record the encoder delay (e.g. AAC's)
        for frame in frames:
            for converted in to_codec.resample(frame):
                container.mux(stream.encode(converted))
        container.mux(stream.encode(None))


def best_correlation(x: np.ndarray, ref: np.ndarray, max_lag: int) -> tuple[float, int]:
    """Highest normalized correlation of x against ref over lags in [-max_lag, max_lag]."""
    n = min(len(x), len(ref)) - 2 * max_lag
    a = ref[max_lag : max_lag + n]
    best = (-1.0, 0)
    for lag in range(-max_lag, max_lag + 1):
        b = x[max_lag + lag : max_lag + lag + n]
        best = max(best, (float(np.dot(a, b) / np.sqrt(np.dot(a, a) * np.dot(b, b))), lag))
    return best


# ----------------------------------------------------------------------------- resample


@pytest.mark.parametrize(
    "from_sr,to_sr",
    [(44100, 24000), (48000, 24000), (8000, 24000), (16000, 24000), (22050, 24000),
     (11025, 24000), (24000, 44100), (44101, 24000)],  # 44101: the per-sample path
)
@pytest.mark.parametrize("freq", [440.0, 3000.0])
def test_resample_matches_the_analytic_sine(from_sr, to_sr, freq):
    n = from_sr // 2
    y = resample(torch.from_numpy(sine(freq, from_sr, n)), from_sr, to_sr).numpy()
    assert y.shape == (math.ceil(n * to_sr / from_sr),)
    expected = sine(freq, to_sr, len(y))
    edge = to_sr // 20  # the signal stops at both ends; compare the inside
    np.testing.assert_allclose(y[edge:-edge], expected[edge:-edge], atol=2e-5)


def test_resample_keeps_the_band_and_removes_aliases():
    n = 44100
    passband = resample(torch.from_numpy(sine(10000.0, 44100, n)), 44100, 24000).numpy()
    np.testing.assert_allclose(passband[2400:-2400], sine(10000.0, 24000, 24000)[2400:-2400],
                               atol=1e-4)
    # 13 kHz is above the new Nyquist (12 kHz): it must vanish, not fold down to 11 kHz.
    alias = resample(torch.from_numpy(sine(13000.0, 44100, n)), 44100, 24000).numpy()
    assert np.abs(alias[2400:-2400]).max() < 1e-3


def test_resample_per_sample_path_equals_polyphase(monkeypatch):
    x = torch.randn(2, 3, 4001, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for from_sr, to_sr in [(44100, 24000), (8000, 24000), (22050, 24000), (24000, 16000)]:
        polyphase = resample(x, from_sr, to_sr)
        monkeypatch.setattr(audio, "MAX_POLYPHASE_KERNEL", 0)
        direct = resample(x, from_sr, to_sr)
        monkeypatch.undo()
        assert direct.shape == polyphase.shape == (2, 3, math.ceil(4001 * to_sr / from_sr))
        torch.testing.assert_close(direct, polyphase, rtol=0, atol=1e-12)


def test_resample_shapes_dtypes_and_errors():
    x = torch.randn(3, 100)
    assert resample(x, 24000, 24000) is x
    for n in [1, 2, 3, 147, 1000]:
        assert resample(torch.randn(n), 44100, 24000).shape == (math.ceil(n * 80 / 147),)
        assert resample(torch.randn(n), 8000, 24000).shape == (3 * n,)
    assert resample(x, 48000, 24000).dtype == torch.float32
    assert resample(x.double(), 48000, 24000).dtype == torch.float64
    with pytest.raises(ValueError, match="floating-point"):
        resample(torch.zeros(10, dtype=torch.int16), 8000, 24000)
    with pytest.raises(ValueError, match="positive integers"):
        resample(x, 0, 24000)
    with pytest.raises(ValueError, match="positive integers"):
        resample(x, 44100.5, 24000)


# ----------------------------------------------------------------------------- load_audio


def test_load_8k_stereo_wav_averages_channels_and_keeps_the_frequency(tmp_path):
    n = 8000
    left, right = sine(440.0, 8000, n), 0.5 * sine(440.0, 8000, n)
    write_wav16(tmp_path / "a.wav", np.stack([left, right]), 8000)
    pcm = load_audio(tmp_path / "a.wav")
    assert pcm.shape == (1, 3 * n) and pcm.dtype == torch.float32
    expected = 0.75 * sine(440.0, 24000, 3 * n)
    np.testing.assert_allclose(pcm[0, 1200:-1200].numpy(), expected[1200:-1200], atol=2e-4)
    spectrum = np.abs(np.fft.rfft(pcm[0].numpy()))
    assert np.argmax(spectrum) * SAMPLE_RATE / (3 * n) == pytest.approx(440.0, abs=1.0)


@pytest.mark.parametrize("rate", [24000, 44100])
def test_load_float_wav_is_exact_at_24k_and_resampled_otherwise(tmp_path, rate):
    x = sine(1000.0, rate, rate // 4)
    save_wav(tmp_path / "f.wav", torch.from_numpy(x), rate, float32=True)
    pcm = load_audio(tmp_path / "f.wav")[0].numpy()
    if rate == SAMPLE_RATE:
        np.testing.assert_array_equal(pcm, x.astype(np.float32))
    else:
        assert len(pcm) == math.ceil(len(x) * SAMPLE_RATE / rate)
        np.testing.assert_allclose(pcm[600:-600], sine(1000.0, 24000, len(pcm))[600:-600],
                                   atol=1e-5)


@pytest.mark.parametrize("rate,channels", [(44100, 2), (8000, 1), (24000, 1)])
def test_a_50ms_file_is_fine(tmp_path, rate, channels):
    n = rate // 20
    write_wav16(tmp_path / "short.wav", np.tile(sine(440.0, rate, n), (channels, 1)), rate)
    pcm = load_audio(tmp_path / "short.wav")
    assert pcm.shape == (1, 1200)
    assert 0.3 < pcm.abs().max() < 0.6


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    """espeak-ng speech: (path of its 22.05 kHz wav, that audio at 24 kHz as the reference)."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("needs espeak-ng")
    path = tmp_path_factory.mktemp("speech") / "speech.wav"
    subprocess.run(["espeak-ng", "-w", str(path), "Open Moshi reads audio files of any format."],
                   check=True, capture_output=True)
    pcm, rate = read_wav(path)
    assert pcm.shape[0] == 1 and pcm.shape[1] > rate  # mono, over a second
    return path, pcm[0], rate


def _speech_file(kind: str, speech, tmp_path):
    """Convert the speech to `kind`: (path, expected sample count at 24 kHz or None if lossy)."""
    src, pcm, rate = speech
    if kind == "wav-8k-stereo-sox":
        if shutil.which("sox") is None:
            pytest.skip("needs sox")
        out = tmp_path / "s.wav"
        subprocess.run(["sox", str(src), "-r", "8000", "-c", "2", str(out)], check=True)
        data, file_rate = read_wav(out)
        assert data.shape[0] == 2 and file_rate == 8000
        return out, 3 * data.shape[1]
    stereo = np.stack([pcm, pcm])
    to44 = resample(torch.from_numpy(stereo), rate, 44100).numpy()
    to48 = resample(torch.from_numpy(pcm[None]), rate, 48000).numpy()
    if kind == "flac-44k-stereo":
        encode(tmp_path / "s.flac", to44, 44100, "flac")
        return tmp_path / "s.flac", math.ceil(to44.shape[1] * 24000 / 44100)
    if kind == "mp3-44k-stereo":
        encode(tmp_path / "s.mp3", to44, 44100, "libmp3lame")
        return tmp_path / "s.mp3", None
    if kind == "ogg-opus-48k":
        encode(tmp_path / "s.ogg", to48, 48000, "libopus", "ogg")
        return tmp_path / "s.ogg", None
    if kind == "opus-24k":
        to24 = resample(torch.from_numpy(pcm[None]), rate, 24000).numpy()
        encode(tmp_path / "s.opus", to24, 24000, "libopus", "ogg")
        return tmp_path / "s.opus", None
    if kind == "m4a-aac-44k":
        encode(tmp_path / "s.m4a", to44, 44100, "aac", "mp4")
        return tmp_path / "s.m4a", None
    raise AssertionError(kind)


@needs_espeak
@pytest.mark.parametrize(
    "kind",
    ["wav-8k-stereo-sox", "flac-44k-stereo", "mp3-44k-stereo", "ogg-opus-48k", "opus-24k",
     "m4a-aac-44k"],
)
def test_load_speech_in_every_format(speech, tmp_path, kind):
    path, exact_length = _speech_file(kind, speech, tmp_path)
    _, pcm, rate = speech
    reference = resample(torch.from_numpy(pcm), rate, SAMPLE_RATE).numpy()
    loaded = load_audio(path)
    assert loaded.dtype == torch.float32 and loaded.dim() == 2 and loaded.shape[0] == 1
    x = loaded[0].numpy().astype(np.float64)
    if exact_length is not None:
        assert len(x) == exact_length
    else:  # lossy codecs pad to whole codec frames; decoders trim most of it
        assert abs(len(x) - len(reference)) <= 0.03 * SAMPLE_RATE, (len(x), len(reference))
    corr, lag = best_correlation(x, reference, max_lag=240)  # within 10 ms
    # Measured: 0.996 at 8 kHz (only the band below 4 kHz is left), 0.999 for the lossy codecs,
    # 0.99999999 for flac; all aligned to the sample once encoder delays are trimmed.
    assert corr > 0.99, (corr, lag)
    assert lag == 0 if exact_length is not None else abs(lag) <= 24, (corr, lag)


# ----------------------------------------------------------------------------- errors


def _wav_header(fmt_tag: int, data: bytes, rate: int = 16000) -> bytes:
    fmt = struct.pack("<HHIIHH", fmt_tag, 1, rate, 2 * rate, 2, 16)
    body = b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data))
    return b"RIFF" + struct.pack("<I", 4 + len(body) + len(data)) + b"WAVE" + body + data


def test_load_errors_name_the_file_and_the_problem(tmp_path):
    cases = {
        "missing.wav": (None, "does not exist"),
        "empty.wav": (b"", "is empty"),
        "text.wav": (b"this is not audio, only text renamed to .wav\n" * 20,
                     "is not a readable audio file"),
        "noise.mp3": (np.random.default_rng(0).bytes(4000), "is not a readable audio file"),
        "unknown_codec.wav": (_wav_header(0x9999, b"\x01\x02" * 500), "cannot decode"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / name
        if content is not None:
            path.write_bytes(content)
        with pytest.raises(AudioError, match=message) as info:
            load_audio(path)
        assert name in str(info.value)
        assert isinstance(info.value, ValueError)
    with pytest.raises(AudioError, match="is not a file"):
        load_audio(tmp_path)


def test_load_a_file_without_samples(tmp_path):
    with wave.open(str(tmp_path / "zero.wav"), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(16000)
    with pytest.raises(AudioError, match=r"file .*zero\.wav has no audio samples"):
        load_audio(tmp_path / "zero.wav")


# ----------------------------------------------------------------------------- save_wav


def test_save_wav_16bit_round_trip_and_clipping(tmp_path):
    x = torch.tensor([[0.0, 0.5, -0.5, 1.5, -1.5, 0.25]])
    save_wav(tmp_path / "a.wav", x)
    data, rate = read_wav(tmp_path / "a.wav")
    assert rate == SAMPLE_RATE and data.shape == (1, 6)
    np.testing.assert_allclose(data[0], [0.0, 0.5, -0.5, 1.0, -1.0, 0.25], atol=1 / 32767)
    save_wav(tmp_path / "b.wav", torch.stack([x[0], -x[0]]), 16000)  # [C, N]
    data, rate = read_wav(tmp_path / "b.wav")
    assert rate == 16000 and data.shape == (2, 6)
    np.testing.assert_allclose(data[1], -data[0], atol=1 / 32767)


def test_save_wav_float32_is_lossless(tmp_path):
    x = torch.randn(24000, generator=torch.Generator().manual_seed(0)) * 2  # [N], beyond [-1, 1]
    save_wav(tmp_path / "f.wav", x, float32=True)
    torch.testing.assert_close(load_audio(tmp_path / "f.wav"), x[None], rtol=0, atol=0)
    with av.open(str(tmp_path / "f.wav")) as container:  # a standard IEEE-float WAV
        assert container.streams.audio[0].codec_context.name == "pcm_f32le"


@needs_sox
def test_save_wav_files_are_read_by_sox(tmp_path):
    save_wav(tmp_path / "a.wav", torch.zeros(2, 4800), 48000)
    save_wav(tmp_path / "f.wav", torch.zeros(4800), 24000, float32=True)
    for name, rate, channels in [("a.wav", "48000", "2"), ("f.wav", "24000", "1")]:
        out = subprocess.run(["soxi", str(tmp_path / name)], check=True, capture_output=True,
                             text=True).stdout
        assert rate in out and f"Channels       : {channels}" in out and "4800 samples" in out


def test_save_wav_errors(tmp_path):
    with pytest.raises(AudioError, match="shape"):
        save_wav(tmp_path / "a.wav", torch.zeros(1, 1, 10))
    with pytest.raises(AudioError, match="channels"):
        save_wav(tmp_path / "a.wav", torch.zeros(1000, 2))  # [N, C] by mistake
    with pytest.raises(AudioError, match="cannot write"):
        save_wav(tmp_path / "no" / "such" / "dir.wav", torch.zeros(10))
