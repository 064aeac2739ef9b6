"""Audio file input/output and resampling.

Mimi works on 24 kHz mono float32 audio in [-1, 1]. `load_audio` turns any file that FFmpeg (through
PyAV) can decode into that: channels are averaged, and the sample rate is converted by `resample`, a
windowed-sinc resampler written in plain torch so that its output length and alignment are exact
and known (`ceil(N * to_sr / from_sr)` samples, output sample j at input time j * from_sr / to_sr).
`save_wav` writes 16-bit PCM or 32-bit float WAV files.

Shapes: C channels, N samples.

May import: openmoshi.errors.
"""

from __future__ import annotations

import math
import os
import struct
from pathlib import Path

import numpy as np
import torch

from openmoshi.errors import UserError

SAMPLE_RATE = 24000  # Mimi's sample rate (Hz).

# Resampler quality: zero crossings of the sinc kept on each side, cutoff as a fraction of the
# lower Nyquist frequency, and the Kaiser window's beta (10 gives about 100 dB of stopband
# attenuation). Measured on sines, 44.1 -> 24 kHz: error below 1e-5 up to 10 kHz, and what
# aliases from 12.6 kHz and above below 1e-5 (FFmpeg's swresample default: 4e-3 at 10 kHz).
LOWPASS_ZERO_CROSSINGS = 32
ROLLOFF = 0.95
KAISER_BETA = 10.0
# The polyphase kernel has one row per output phase and spans a whole input period; past this
# many elements (rates whose gcd is small, e.g. 44101 Hz) each output sample reads only the
# inputs around it instead.
MAX_POLYPHASE_KERNEL = 1 << 22
_CHUNK = 1 << 16  # output samples per chunk on the per-sample path (bounds memory).

# PyAV sample formats (planar or packed) -> (offset, scale) that map the samples to [-1, 1].
_FORMATS = {
    "u8": (128.0, 128.0),
    "s16": (0.0, 32768.0),
    "s32": (0.0, 2147483648.0),
    "s64": (0.0, 9223372036854775808.0),
    "flt": (0.0, 1.0),
    "dbl": (0.0, 1.0),
}


class AudioError(UserError):
    """An audio file or array could not be read, written or used; the message says which and why."""


def load_audio(path: str | os.PathLike, sample_rate: int = SAMPLE_RATE, mono: bool = True) -> torch.Tensor:
    """Decode the first audio stream of `path` to float32 at `sample_rate`: [1, N] averaged over
    the channels (`mono`), else [C, N] with the file's channels."""
    import av  # Imported here so that `import openmoshi.audio` stays cheap.

    path = Path(path)
    if not path.exists():
        raise AudioError(f"file {path} does not exist")
    if not path.is_file():
        raise AudioError(f"{path} is not a file")
    if path.stat().st_size == 0:
        raise AudioError(f"file {path} is empty")
    try:
        container = av.open(str(path), mode="r")
    except av.FFmpegError as e:
        raise AudioError(f"file {path} is not a readable audio file ({_reason(e)})") from None
    with container:
        if not container.streams.audio:
            raise AudioError(f"file {path} has no audio stream")
        stream = container.streams.audio[0]
        # Decoded frames [C, n] (C = 1 for mono), grouped into runs of one sample rate (a stream
        # may change rate midway, e.g. chained Ogg files).
        runs: list[tuple[int, list[np.ndarray]]] = []
        try:
            for frame in container.decode(stream):
                samples = _frame_samples(frame, path, mono)
                if runs and samples.shape[0] != runs[-1][1][0].shape[0]:
                    raise AudioError(f"file {path} changes its number of channels midway")
                if runs and runs[-1][0] == frame.sample_rate:
                    runs[-1][1].append(samples)
                else:
                    runs.append((frame.sample_rate, [samples]))
        except av.FFmpegError as e:
            codec = stream.codec_context.name if stream.codec_context else "unknown"
            raise AudioError(
                f"cannot decode the audio in file {path} (codec {codec}: {_reason(e)})"
            ) from None
    pieces = []
    for rate, frames in runs:
        pcm = torch.from_numpy(np.concatenate(frames, axis=1))  # [C, n]
        pieces.append(resample(pcm, rate, sample_rate))
    pcm = torch.cat(pieces, dim=1) if pieces else torch.zeros(1, 0)
    if pcm.numel() == 0:
        raise AudioError(f"file {path} has no audio samples")
    return pcm.to(torch.float32)  # [C, N]


def _reason(error: Exception) -> str:
    # FFmpeg errors carry the file name in their str(); keep only the description.
    return getattr(error, "strerror", None) or str(error)


def _frame_samples(frame, path: Path, mono: bool) -> np.ndarray:
    """One decoded PyAV audio frame -> float32 samples in [-1, 1], [C, n] ([1, n] if `mono`)."""
    name = frame.format.name.rstrip("p")
    if name not in _FORMATS:
        raise AudioError(f"unsupported sample format {frame.format.name!r} in file {path}")
    offset, scale = _FORMATS[name]
    data = frame.to_ndarray().astype(np.float64)
    channels = len(frame.layout.channels)
    if not frame.format.is_planar:
        data = data.reshape(-1, channels).T  # packed [1, N * C] -> [C, N]
    data = data.reshape(channels, -1)
    if mono:
        data = data.mean(axis=0, keepdims=True)
    return ((data - offset) / scale).astype(np.float32)


def _kernel(phase_times: torch.Tensor, cutoff: float, zero_crossings: int) -> torch.Tensor:
    """Kaiser-windowed sinc low-pass at `cutoff` (cycles per input sample), unit DC gain.

    `phase_times` are offsets in input samples between an output sample and the input samples it
    reads; the result has the same shape.
    """
    t = phase_times * (2 * cutoff)  # in zero crossings of the sinc
    u = (t / zero_crossings).clamp(-1, 1)
    window = torch.special.i0(KAISER_BETA * torch.sqrt(1 - u * u)) / torch.special.i0(
        torch.tensor(KAISER_BETA, dtype=t.dtype)
    )
    window = torch.where(t.abs() <= zero_crossings, window, torch.zeros_like(window))
    return 2 * cutoff * torch.sinc(t) * window


def resample(pcm: torch.Tensor, from_sr: int, to_sr: int) -> torch.Tensor:
    """Resample the last axis of `pcm` [..., N] from `from_sr` to `to_sr` Hz -> [..., M], with
    M = ceil(N * to_sr / from_sr).

    Band-limited (Kaiser-windowed sinc) interpolation; the signal beyond both ends counts as
    silence. Output sample j sits at input time j * from_sr / to_sr, so sample 0 is aligned.
    """
    if from_sr <= 0 or to_sr <= 0 or int(from_sr) != from_sr or int(to_sr) != to_sr:
        raise AudioError(f"sample rates must be positive integers, got {from_sr} and {to_sr}")
    if not pcm.is_floating_point():
        raise AudioError(f"resample needs a floating-point tensor, got {pcm.dtype}")
    g = math.gcd(int(from_sr), int(to_sr))
    up, down = int(to_sr) // g, int(from_sr) // g  # output j reads input time j * down / up
    if up == down:
        return pcm
    shape, n = pcm.shape[:-1], pcm.shape[-1]
    x = pcm.reshape(-1, n)  # [B, N]
    n_out = -(-n * up // down)  # ceil(N * up / down)
    cutoff = ROLLOFF * 0.5 * min(1.0, up / down)  # cycles per input sample
    width = math.ceil(LOWPASS_ZERO_CROSSINGS / (2 * cutoff))  # kernel half-width, input samples
    if up * (2 * width + down) <= MAX_POLYPHASE_KERNEL:
        y = _resample_polyphase(x, up, down, width, cutoff)
    else:
        y = _resample_direct(x, up, down, width, cutoff)
    return y[:, :n_out].reshape(*shape, n_out)


def _resample_polyphase(x: torch.Tensor, up: int, down: int, width: int, cutoff: float):
    """Output j = k * up + p reads inputs k * down - width ... k * down + down + width - 1.

      padded x:  [ width zeros | x_0 ... x_{N-1} | width + down zeros ]
      frame k:    window of 2 * width + down samples starting at k * down, stride down
      phase p:    kernel row p, output time k * down + p * down / up (in input samples)
    """
    taps = torch.arange(-width, width + down, dtype=torch.float64)  # input offsets in a frame
    phases = torch.arange(up, dtype=torch.float64)[:, None] * down / up  # [up, 1]
    kernel = _kernel(taps[None, :] - phases, cutoff, LOWPASS_ZERO_CROSSINGS).to(x.dtype)  # [up, L]
    padded = torch.nn.functional.pad(x, (width, width + down))[:, None]  # [B, 1, N + L]
    y = torch.nn.functional.conv1d(padded, kernel[:, None], stride=down)  # [B, up, frames]
    return y.transpose(1, 2).reshape(x.shape[0], -1)  # [B, frames * up]


def _resample_direct(x: torch.Tensor, up: int, down: int, width: int, cutoff: float):
    """The same sum as the polyphase path, reading only the 2 * width + 1 inputs around each
    output sample: output j sits at input time j * down / up = base + frac, and its kernel row
    depends only on j % up."""
    n = x.shape[-1]
    n_out = -(-n * up // down)
    padded = torch.nn.functional.pad(x, (width, width + 1))  # [B, N + 2 * width + 1]
    taps = torch.arange(-width, width + 1)  # [L]
    frac = (torch.arange(up) * down % up).to(torch.float64) / up  # [up], in [0, 1)
    table = _kernel(taps[None, :] - frac[:, None], cutoff, LOWPASS_ZERO_CROSSINGS).to(x.dtype)
    out = []
    for start in range(0, n_out, _CHUNK):
        j = torch.arange(start, min(start + _CHUNK, n_out))  # [J]
        idx = (j * down // up)[:, None] + taps[None, :] + width  # [J, L] indices into padded
        out.append((padded[:, idx] * table[j % up]).sum(-1))  # [B, J]
    return torch.cat(out, dim=-1)


def save_wav(
    path: str | os.PathLike,
    pcm: torch.Tensor,
    sample_rate: int = SAMPLE_RATE,
    float32: bool = False,
) -> None:
    """Write `pcm` [C, N] or [N] (float in [-1, 1]) as a WAV file.

    16-bit PCM by default (values outside [-1, 1] are clipped); `float32=True` writes IEEE float
    samples unclipped.
    """
    pcm = torch.as_tensor(pcm).detach().cpu()
    if pcm.dim() == 1:
        pcm = pcm[None]
    if pcm.dim() != 2:
        raise AudioError(f"save_wav expects pcm of shape [C, N] or [N], got {tuple(pcm.shape)}")
    if not 1 <= pcm.shape[0] <= 64:
        raise AudioError(f"save_wav expects 1 to 64 channels, got {pcm.shape[0]} (shape [C, N]?)")
    channels = pcm.shape[0]
    interleaved = pcm.to(torch.float32).T.contiguous().numpy()  # [N, C]
    if float32:
        data, fmt_tag, bits = interleaved.astype("<f4").tobytes(), 3, 32
    else:
        samples = np.round(np.clip(interleaved, -1.0, 1.0) * 32767.0)
        data, fmt_tag, bits = samples.astype("<i2").tobytes(), 1, 16
    block = channels * bits // 8
    fmt = struct.pack("<HHIIHH", fmt_tag, channels, sample_rate, sample_rate * block, block, bits)
    chunks = [b"fmt ", struct.pack("<I", len(fmt)), fmt]
    if float32:  # non-PCM formats carry a `fact` chunk with the number of sample frames
        chunks += [b"fact", struct.pack("<II", 4, pcm.shape[1])]
    chunks += [b"data", struct.pack("<I", len(data)), data]
    body = b"".join(chunks)
    if len(body) + 4 >= 1 << 32:
        raise AudioError(f"audio too long for a WAV file ({pcm.shape[1]} samples)")
    try:
        with open(path, "wb") as f:
            f.write(b"RIFF" + struct.pack("<I", 4 + len(body)) + b"WAVE" + body)
    except OSError as e:
        raise AudioError(f"cannot write {path}: {e.strerror or e}") from None
