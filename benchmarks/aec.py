"""Echo cancellation of `openmoshi client` on a simulated room (issue 10): how much of Moshi's voice,
played by the loudspeaker, the microphone still hears, and how much of the user's voice it keeps.

    python benchmarks/aec.py [--seconds 12] [--json out.json]

The room: Moshi's voice (espeak-ng, a male voice) goes to the speaker through the client's own
sound card callback (`client._Duplex`, fed the way the server feeds it, 80 ms at a time), comes
back to the microphone through a room impulse response (a direct path and exponentially decaying
noise of a given RT60) and the sound card's round trip (output plus input latency), and the user
(espeak-ng, a female voice) starts talking in the middle of it: far end alone, then double talk.
The simulated sound card reports its round trip in the callback's timestamps, as PortAudio does.
The microphone frames and their references then go through `aec.EchoCanceller`, as the client's
sender does.

Numbers:
- ERLE (echo return loss enhancement), far end alone, after `--converge` seconds: microphone power
  over cleaned power, in dB;
- near-end SNR before / after, during double talk: the user's speech over everything else. The
  canceller delays and filters a little (about 9 ms, a high-pass), so both are measured on
  short-time magnitude spectra after lining the output up with the user's speech, and scale-invariant
  (the user's speech N scaled to its level in X): sum |N|^2 over sum (|X| - |N|)^2, X the microphone
  (before) or the cleaned signal (after);
- near-end level: the cleaned double-talk power over the user's speech power, in dB (how much the
  echo suppressor ducks the user).

Rows: the client as it is (and the user alone, Moshi silent), then what a wrong implementation
would give (no canceller; a reference that arrives later than its echo, i.e. a wrong round trip; a
reference of something else), and one it forgives (the round trip ignored: the reference early).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
import wave
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from openmoshi.serving.aec import EchoCanceller  # noqa: E402
from openmoshi.serving.client import FRAME_SIZE, SAMPLE_RATE, _Duplex, _Playback  # noqa: E402

BLOCK = FRAME_SIZE // 4  # the client's sound card block (20 ms)
MOSHI_TEXT = ("Hello, I am Moshi. I can listen and talk at the same time. What would you like to talk about "
              "today? Maybe the weather, or a good book that you have read recently. I like stories about the sea.")
USER_TEXT = "Sorry to interrupt you, but I wanted to ask about something else entirely. Can you hear me?"


def espeak(text: str, voice: str, pitch: int = 50, speed: int = 160) -> np.ndarray:
    """espeak-ng speech, float32 [N] at 24 kHz (linear interpolation from its 22.05 kHz)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "speech.wav"
        subprocess.run(["espeak-ng", "-v", voice, "-p", str(pitch), "-s", str(speed), "-w", str(path), text],
                       check=True, capture_output=True)
        with wave.open(str(path)) as w:
            rate = w.getframerate()
            x = np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32) / 32768.0
    t = np.arange(int(len(x) * SAMPLE_RATE / rate)) / SAMPLE_RATE
    return np.interp(t, np.arange(len(x)) / rate, x).astype(np.float32)


def room_response(rt60_s: float, seed: int = 0, direct_s: float = 0.003) -> np.ndarray:
    """A direct path, then exponentially decaying noise (-60 dB after `rt60_s`); unit energy."""
    rng = np.random.default_rng(seed)
    n = int(min(rt60_s, 0.5) * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    h = 0.3 * rng.standard_normal(n) * np.exp(-6.9 * t / rt60_s)
    d = int(direct_s * SAMPLE_RATE)
    h[:d] = 0.0
    h[d] = 1.0
    return (h / np.sqrt(np.sum(h**2))).astype(np.float32)


@dataclass
class Scene:
    far: np.ndarray  # what the server sends (Moshi), float32 [N]
    near: np.ndarray  # the user as the microphone hears them, [N], zero outside [near_start, near_end)
    near_start: int
    near_end: int
    rir: np.ndarray  # speaker -> microphone
    round_trip: int  # samples between a block's capture and the playing of the block handed over with it
    echo_gain: float
    noise: np.ndarray


def make_scene(far: np.ndarray, user: np.ndarray, *, rt60_s: float = 0.3, round_trip_s: float = 0.06,
               echo_db: float = 0.0, near_start_s: float = 5.0, seconds: float | None = None,
               seed: int = 0) -> Scene:
    """The echo is `echo_db` louder than the user at the microphone (0: as loud, a laptop's speakers)."""
    n = int((seconds or len(far) / SAMPLE_RATE) * SAMPLE_RATE)
    far = np.pad(far, (0, max(0, n - len(far))))[:n]
    far = far / np.sqrt(np.mean(far**2)) * 0.1  # -20 dBFS
    start = int(near_start_s * SAMPLE_RATE)
    user = user[: max(0, n - start)]
    near = np.zeros(n, np.float32)
    near[start : start + len(user)] = user / np.sqrt(np.mean(user**2)) * 0.05
    rir = room_response(rt60_s, seed)
    # Scale the echo so that, where Moshi speaks, it is echo_db above the user's speech level.
    echo = np.convolve(far[: 4 * SAMPLE_RATE], rir)[: 4 * SAMPLE_RATE]
    gain = 0.05 * 10 ** (echo_db / 20) / np.sqrt(np.mean(echo**2))
    noise = (np.random.default_rng(seed + 1).standard_normal(n) * 1e-4).astype(np.float32)  # -80 dBFS
    return Scene(far.astype(np.float32), near, start, start + len(user), rir, int(round_trip_s * SAMPLE_RATE),
                 float(gain), noise)


def through_client(scene: Scene, reported_round_trip_s: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Runs the client's sound card callback against the simulated room; returns the microphone and
    the reference the client pairs with it, float32 [M] each, M a multiple of 80 ms.

    `reported_round_trip_s`: what the sound card's timestamps claim (default: the truth)."""
    assert scene.round_trip >= BLOCK, "the echo of a block must not reach the block captured with it"
    reported = scene.round_trip / SAMPLE_RATE if reported_round_trip_s is None else reported_round_trip_s
    n = len(scene.far) // FRAME_SIZE * FRAME_SIZE
    playback = _Playback()
    frames: list[tuple[np.ndarray, np.ndarray]] = []
    duplex = _Duplex(playback, lambda mic, ref: frames.append((mic, ref)))
    size = 1 << int(np.ceil(np.log2(BLOCK + len(scene.rir))))
    rir_f = np.fft.rfft(scene.rir * scene.echo_gain, size)
    acoustic = np.zeros(n + scene.round_trip + size, np.float32)  # what reaches the microphone from the speaker
    out = np.zeros((BLOCK, 1), np.float32)
    for k in range(n // BLOCK):
        i = k * BLOCK
        if i % FRAME_SIZE == 0:  # the server's 80 ms frame arrives
            playback.push(scene.far[i : i + FRAME_SIZE])
        indata = (acoustic[i : i + BLOCK] + scene.near[i : i + BLOCK] + scene.noise[i : i + BLOCK])[:, None]
        t = i / SAMPLE_RATE
        duplex(indata, out, BLOCK, SimpleNamespace(inputBufferAdcTime=t, outputBufferDacTime=t + reported), None)
        # The block just handed over sounds round_trip after the captured one began.
        echo = np.fft.irfft(np.fft.rfft(out[:, 0], size) * rir_f, size)
        acoustic[i + scene.round_trip : i + scene.round_trip + size] += echo.astype(np.float32)
    mic = np.concatenate([m for m, _ in frames])
    reference = np.concatenate([r for _, r in frames])
    return mic, reference


def cancel(mic: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """As the client's sender: one canceller, one 80 ms frame at a time."""
    canceller = EchoCanceller()
    return np.concatenate([canceller.process(mic[i : i + FRAME_SIZE], reference[i : i + FRAME_SIZE])
                           for i in range(0, len(mic), FRAME_SIZE)])


def _db(num: float, den: float) -> float:
    return float(10 * np.log10(max(num, 1e-20) / max(den, 1e-20)))


def _magnitudes(x: np.ndarray, size: int = 512) -> np.ndarray:
    hop = size // 2
    frames = np.lib.stride_tricks.sliding_window_view(x, size)[::hop]
    return np.abs(np.fft.rfft(frames * np.hanning(size), axis=-1))


def near_snr(near: np.ndarray, x: np.ndarray, max_lag_s: float = 0.04) -> float:
    """The user's speech `near` over the rest in `x`, on magnitude spectra, `x` first shifted by the
    lag (0 to `max_lag_s`) that lines it up best with `near`. Scale-invariant: how loud the user
    comes out is `near_level_db`'s business."""
    max_lag = int(max_lag_s * SAMPLE_RATE)
    body = slice(max_lag, len(near) - max_lag)
    lags = range(0, max_lag + 1)
    lag = max(lags, key=lambda d: float(np.dot(near[body], x[body.start + d : body.stop + d])))
    n_mag, x_mag = _magnitudes(near[body]), _magnitudes(x[body.start + lag : body.stop + lag])
    n_mag = n_mag * np.sum(x_mag * n_mag) / np.sum(n_mag**2)  # the user's speech as it is in x
    return _db(np.sum(n_mag**2), np.sum((x_mag - n_mag) ** 2))


def measure(scene: Scene, mic: np.ndarray, cleaned: np.ndarray, converge_s: float = 1.0) -> dict[str, float]:
    far_only = slice(int(converge_s * SAMPLE_RATE), scene.near_start)
    talk = slice(scene.near_start, min(scene.near_end, len(mic)))
    near = scene.near[talk]
    return {
        "erle_db": _db(np.sum(mic[far_only] ** 2), np.sum(cleaned[far_only] ** 2)),
        "near_snr_before_db": near_snr(near, mic[talk]),
        "near_snr_after_db": near_snr(near, cleaned[talk]),
        "near_level_db": _db(np.sum(cleaned[talk] ** 2), np.sum(near**2)),
    }


def run(scene: Scene, case: str = "client") -> dict[str, float]:
    """One row: `case` is "client" (as it is), "moshi-silent" (the client, Moshi saying nothing:
    the user alone, for what the canceller does to them; no ERLE then), "no-aec", "late-reference"
    (the timestamps claim a round trip 50 ms too long: the reference comes after its echo),
    "round-trip-ignored" (the timestamps claim none: the reference comes 60 ms early, which AEC3's
    own delay estimator absorbs) or "other-reference" (the reference is speech other than Moshi's)."""
    if case == "moshi-silent":
        scene = replace(scene, far=np.zeros_like(scene.far))
    reported = {"late-reference": scene.round_trip / SAMPLE_RATE + 0.05, "round-trip-ignored": 1e-6}.get(case)
    mic, reference = through_client(scene, reported)
    if case == "other-reference":
        reference = np.roll(reference, len(reference) // 2)
    cleaned = mic if case == "no-aec" else cancel(mic, reference)
    row = measure(scene, mic, cleaned)
    if case == "moshi-silent":
        row["erle_db"] = float("nan")
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=12.0)
    ap.add_argument("--near-start", type=float, default=6.0, help="when the user starts talking (s)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    far = espeak(MOSHI_TEXT, "en-us")
    user = espeak(USER_TEXT, "en-gb+f3", pitch=70)
    rows = []
    scenes = [dict(rt60_s=0.3, round_trip_s=0.06, echo_db=0.0)]
    scenes += [dict(rt60_s=rt, round_trip_s=0.06, echo_db=0.0) for rt in (0.15, 0.5)]
    scenes += [dict(rt60_s=0.3, round_trip_s=rt, echo_db=0.0) for rt in (0.03, 0.2)]
    scenes += [dict(rt60_s=0.3, round_trip_s=0.06, echo_db=db) for db in (-10.0, 10.0)]
    for i, kw in enumerate(scenes):
        scene = make_scene(far, user, seconds=args.seconds, near_start_s=args.near_start, **kw)
        cases = (("client", "moshi-silent", "no-aec", "late-reference", "round-trip-ignored", "other-reference")
                 if i == 0 else ("client",))
        for case in cases:
            t0 = time.perf_counter()
            row = {**kw, "case": case, **run(scene, case), "seconds": time.perf_counter() - t0}
            rows.append(row)
            print(f"rt60 {kw['rt60_s']:.2f} s  round trip {kw['round_trip_s'] * 1000:3.0f} ms  "
                  f"echo {kw['echo_db']:+4.0f} dB  {case:18s} ERLE {row['erle_db']:5.1f} dB  "
                  f"near SNR {row['near_snr_before_db']:5.1f} -> {row['near_snr_after_db']:5.1f} dB  "
                  f"near level {row['near_level_db']:+5.1f} dB  ({row['seconds']:.1f} s for {args.seconds:.0f} s)",
                  flush=True)
    if args.json:
        from importlib.metadata import version

        Path(args.json).write_text(json.dumps({"machine": platform.processor() or platform.machine(),
                                               "livekit": version("livekit"), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
