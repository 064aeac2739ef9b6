"""Speech to text with Kyutai STT on recorded audio: timed words and pause probabilities.

    results = transcribe(model, ["a.wav", "b.wav"])      # one batch; model: a loaded STT model
    results[0].words                                      # [TimedWord(text, start, stop)]
    results[0].prs                                        # per step, each extra head's P(class 0)

Each input is one STT stream exactly as the server runs one (`openmoshi.lm.stt`): the silence
prefix of `stt_config`, the input (its last partial frame padded with silence, as
delayed-streams-modeling's scripts), then `audio_delay_seconds` + TAIL_SECONDS of silence so that
the input's last words come out; the first frame read twice (the first step reads only initial
tokens; the encoder restarts after that frame, so both readings have the same codes). Words and
times are moshi-server's (`lm.stt.WordTracker`); decoding is greedy, as moshi-server's default.
`prs` are what moshi-server sends in its `Step` messages: per step, each extra head's probability
of its first class (Unmute reads the third head's as "the user has stopped talking").

Several inputs run as one batch; a shorter input's row reads silence after its own end, which its
results never include: each result equals its input's solo run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from openmoshi.audio import AudioError
from openmoshi.engine.engine import Engine
from openmoshi.engine.speed import Speed, SpeedConfig, choose
from openmoshi.errors import UserError
from openmoshi.inference.offline import as_pcm
from openmoshi.lm.sampling import SamplingConfig
from openmoshi.lm.stt import FRAME_RATE, SttTiming, TimedWord, WordTracker, timed_words
from openmoshi.mimi.codec import FRAME_SIZE

TAIL_SECONDS = 1.0  # silence after audio_delay_seconds, as the official run_inference


class NotSttError(UserError):
    """The model is not a speech-to-text model."""


@dataclass(frozen=True)
class SttResult:
    words: list[TimedWord]
    tokens: list[int]  # the text token of every step
    prs: list[list[float]] | None  # per step, each extra head's probability of class 0; None: no heads
    timing: SttTiming

    @property
    def text(self) -> str:
        return " ".join(w.text for w in self.words)


def check_stt(config) -> None:
    """NotSttError unless `config` (a ModelConfig) is a speech-to-text model."""
    if config.model_type != "stt" or config.lm.dep_q != 0:
        raise NotSttError(f"this is a {config.model_type} model (dep_q={config.lm.dep_q}), not speech to text: "
                          "use a Kyutai STT model such as kyutai/stt-1b-en_fr (config.json model_type 'stt')")


def stream_frames(pcm: torch.Tensor, timing: SttTiming, tail_frames: int) -> torch.Tensor:
    """pcm [1, N] -> the stream's frames [T, FRAME_SIZE]: prefix silence, the input (its last
    partial frame padded), `tail_frames` of silence."""
    n = pcm.shape[-1]
    whole = -(-n // FRAME_SIZE) * FRAME_SIZE
    x = torch.nn.functional.pad(pcm[0].float(), (timing.prefix_frames * FRAME_SIZE,
                                                 whole - n + tail_frames * FRAME_SIZE))
    return x.view(-1, FRAME_SIZE)


def tail_frames(timing: SttTiming, tail_seconds: float = TAIL_SECONDS) -> int:
    return timing.delay_tokens + int(round(tail_seconds * FRAME_RATE))


@torch.no_grad()
def transcribe(model, inputs: list, delay_tokens: int | None = None, speed: Speed | None = None,
               tail_seconds: float = TAIL_SECONDS, sample_rate: int = 24000) -> list[SttResult]:
    """Runs the STT model over `inputs` (paths, or arrays at `sample_rate`) as one batch; see the
    module doc. `delay_tokens`: moshi-server's asr_delay_in_tokens (default from stt_config)."""
    check_stt(model.config)
    timing = SttTiming.of(model.config, delay_tokens)
    heard = [as_pcm(x, sample_rate) for x in inputs]
    for x, p in zip(inputs, heard):
        if p.shape[-1] == 0:
            raise AudioError(f"{x if isinstance(x, (str, Path)) else 'input array'} has no samples")
    streams = [stream_frames(p, timing, tail_frames(timing, tail_seconds)) for p in heard]
    B, T = len(streams), max(s.shape[0] for s in streams)
    frames = torch.zeros(B, T, FRAME_SIZE)
    for b, s in enumerate(streams):
        frames[b, :s.shape[0]] = s  # a shorter stream's row goes on with silence
    speed = speed or choose(model.device, SpeedConfig(cuda_graphs=False, self_check=False))
    engine = Engine.build(model, B, speed, SamplingConfig.greedy(), slot_streams=False, all_buckets=False)
    lm_cfg = model.lm.cfg
    trackers = [WordTracker(timing, lm_cfg.existing_text_padding_id, lm_cfg.existing_text_end_padding_id)
                for _ in range(B)]
    events, tokens = [[] for _ in range(B)], [[] for _ in range(B)]
    prs: list[list] | None = [[] for _ in range(B)] if len(model.lm.extra_heads) else None
    for s in range(T + 1):
        f = max(s - 1, 0)  # the first frame twice
        codes = engine.encode(frames[:, f:f + 1].to(engine.device))  # [B, K, 1]
        if s == 0:  # the first frame's second reading starts from a fresh encoder, like the first
            engine.enc.reset()
        out = engine.step(codes[:, :, 0])
        text = out.text.tolist()
        pr = out.prs[:, :, 0].tolist() if prs is not None else None
        for b in range(B):
            if s > streams[b].shape[0]:
                continue  # past this input's own stream
            tokens[b].append(text[b])
            events[b] += trackers[b].push(text[b])
            if prs is not None:
                prs[b].append(pr[b])
    decode = model.tokenizer.decode
    return [SttResult(timed_words(events[b], decode), tokens[b], None if prs is None else prs[b], timing)
            for b in range(B)]
