"""Kyutai TTS offline: requests (turns of text and their voices) to audio and word timings, in
batches, as `moshi-tts` (`moshi/run_tts.py`) does.

    tts = load_tts(resolve_files(hf_repo="kyutai/tts-1.6b-en_fr"), device="cuda")
    [out] = tts.synthesize([TTSRequest(turns=["Hello world."], voices=["expresso/ex03-ex01_happy_001_channel1_334s.wav"])])
    out.pcm [N] float32 at 24 kHz, out.words [Word(text, start, end)]

The audio of a request runs from the frame where the audio starts (the LM's frames from
`delay_steps` on, decoded by Mimi as a stream) to `final_padding` frames after its script ran
out; an audio prefix's own frames are cut off. A word's start is the frame its text was fed
(where its sound begins, the audio being delayed by as much as it is cut), its end the next
entry's start (a word or a break) or the end of the script, in seconds of the output.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import torch

from openmoshi.errors import UserError
from openmoshi.lm.tts import TTSError, TTSSettings, TTSSpec, condition_values, generate, tts_spec, word_timings
from openmoshi.lm.tts_script import script_to_entries
from openmoshi.loading.model import LoadedModel, load_model
from openmoshi.loading.resolve import ModelFiles
from openmoshi.loading.tts_voices import DEFAULT_VOICE_REPO, audio_prefix, load_speaker_embedding, resolve_tts_voice

DEFAULT_TTS_REPO = "kyutai/tts-1.6b-en_fr"


class RequestError(UserError):
    """A TTS request that cannot be used (a JSONL line, its turns or voices); the message says where."""


@dataclass(frozen=True)
class TTSRequest:
    """One text to speak, as a `moshi-tts` JSONL line: `turns` (the first is the main speaker's,
    then they alternate), `voices` (one per speaker, main first; exactly one for an audio-prefix
    model), `id` (the output's name)."""

    turns: tuple[str, ...]
    voices: tuple[str, ...]
    id: str = "tts"

    @staticmethod
    def from_json(line: str, where: str = "") -> "TTSRequest":
        """A JSONL line -> TTSRequest; RequestError naming `where` (e.g. "requests.jsonl line 3")."""
        at = f"{where}: " if where else ""
        try:
            data = json.loads(line)
        except json.JSONDecodeError as e:
            raise RequestError(f"{at}not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(data, dict):
            raise RequestError(f"{at}expected an object {{\"turns\": [...], \"voices\": [...], \"id\": ...}}")
        unknown = set(data) - {"turns", "voices", "id"}
        if unknown:
            raise RequestError(f"{at}unknown key {sorted(unknown)[0]!r} (expected turns, voices, id)")
        for key in ("turns", "voices", "id"):
            if key not in data:
                raise RequestError(f"{at}missing key {key!r}")
        turns, voices, id_ = data["turns"], data["voices"], data["id"]
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
            raise RequestError(f"{at}'turns' must be a non-empty list of strings")
        if not isinstance(voices, list) or not voices or not all(isinstance(v, str) and v for v in voices):
            raise RequestError(f"{at}'voices' must be a non-empty list of voice names")
        if not isinstance(id_, (str, int)) or not str(id_) or "/" in str(id_) or str(id_).startswith("."):
            raise RequestError(f"{at}'id' must be a file name (no '/', not starting with '.'), got {id_!r}")
        return TTSRequest(tuple(turns), tuple(voices), str(id_))


@dataclass(frozen=True)
class Word:
    text: str
    start: float  # seconds of the output
    end: float | None  # None: the script did not finish


@dataclass
class TTSOutput:
    id: str
    pcm: torch.Tensor  # [N] float32 at 24 kHz
    words: list[Word]
    frames: torch.Tensor  # [1 + Q, T] the LM's frames (muxed text, audio codes)
    finished: bool  # the whole script was said within max_gen_length
    extra: dict = field(default_factory=dict)

    def timings(self) -> dict:
        """The JSON the CLI writes: the request's id, its words with their times, the duration."""
        return {"id": self.id, "duration": round(self.pcm.shape[-1] / 24000, 4), "finished": self.finished,
                "words": [{"text": w.text, "start": round(w.start, 4),
                           "end": None if w.end is None else round(w.end, 4)} for w in self.words]}


@dataclass
class TTSModel:
    model: LoadedModel
    spec: TTSSpec
    voice_repo: str | None = DEFAULT_VOICE_REPO

    @property
    def frame_rate(self) -> float:
        return self.model.mimi.frame_rate

    def conditions(self, request: TTSRequest, settings: TTSSettings) -> tuple[dict, torch.Tensor | None]:
        """A request's condition values and audio prefix (codes [K, P] or None)."""
        spec, config = self.spec, self.model.config
        cfg_value = settings.cfg_coef if spec.cfg_values else None
        if spec.multi_speaker:
            embeddings = [load_speaker_embedding(resolve_tts_voice(v, config, self.voice_repo))
                          for v in request.voices]
            return condition_values(spec, embeddings, cfg_value), None
        if len(request.voices) != 1:
            raise RequestError(f"request {request.id!r}: this model takes exactly one voice (an audio prefix), "
                               f"got {len(request.voices)}")
        prefix = audio_prefix(resolve_tts_voice(request.voices[0], config, self.voice_repo), self.model.mimi)
        return condition_values(spec, (), cfg_value), prefix

    @torch.no_grad()
    def synthesize(self, requests: Sequence[TTSRequest], settings: TTSSettings = TTSSettings(),
                   seed: int | None = None, on_frame: Callable[[torch.Tensor], None] | None = None) -> list[TTSOutput]:
        """Speaks the requests as one batch."""
        spec, model = self.spec, self.model
        if not requests:
            return []
        n_q = min(settings.n_q or model.lm.cfg.dep_q, model.lm.cfg.dep_q)
        settings = replace(settings, n_q=n_q)
        entries, values, prefixes = [], [], []
        for r in requests:
            e = script_to_entries(model.tokenizer, r.turns, self.frame_rate, spec.multi_speaker, settings.padding_between)
            if not any(x.tokens for x in e):
                raise RequestError(f"request {r.id!r} has no words to say")
            entries.append(e)
            v, p = self.conditions(r, settings)
            values.append(v)
            prefixes.append(p)
        generator = None
        if seed is not None:
            generator = torch.Generator(model.device).manual_seed(seed)
        result = generate(model.lm, spec, settings, entries, values,
                          None if prefixes[0] is None else prefixes, generator=generator, on_frame=on_frame)
        pcm = self.decode(result.frames[:, 1:, spec.delay_steps:])  # [B, N]
        outputs = []
        sr, fr = model.mimi.sample_rate, self.frame_rate
        for b, r in enumerate(requests):
            end = result.end_steps[b]
            length = pcm.shape[-1] if end is None else int(sr * (end + settings.final_padding) / fr)
            start_frames = 0 if prefixes[b] is None else prefixes[b].shape[-1]
            wav = pcm[b, :length][int(sr * start_frames / fr):]
            outputs.append(TTSOutput(id=r.id, pcm=wav.clamp(-1, 1).cpu(), frames=result.frames[b].cpu(),
                                     words=[Word(*w) for w in word_timings(result.scripts[b], fr, start_frames)],
                                     finished=end is not None))
        return outputs

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Audio codes [B, Q, T] -> pcm [B, T * frame_size], decoded frame by frame as a stream."""
        mimi = self.model.mimi
        B, _, T = codes.shape
        if T == 0:
            return torch.zeros(B, 0)
        state = mimi.init_decode_state(B)
        device = next(mimi.parameters()).device
        return torch.cat([mimi.decode_step(codes[:, :, t:t + 1].clamp(min=0).to(device), state)[:, 0]
                          for t in range(T)], dim=-1).float()


def load_tts(files: ModelFiles, device=None, dtype=None, voice_repo: str | None = DEFAULT_VOICE_REPO,
             quantize: str | None = None) -> TTSModel:
    """A TTS model from its files; TTSError when they are not a TTS model."""
    if files.config.model_type != "tts" and not files.config.tts_config:
        raise TTSError(f"this is a {files.config.model_type} model, not a TTS model: use a Kyutai TTS "
                       f"checkpoint, e.g. --hf-repo {DEFAULT_TTS_REPO}")
    spec = tts_spec(files.config)
    return TTSModel(load_model(files, device=device, dtype=dtype, quantize=quantize), spec, voice_repo)

