"""Offline inference: run the model over recorded audio, with the official offline frame policy.

    model = openmoshi.inference.load()                      # kyutai/moshiko-pytorch-bf16
    result = model.run("question.wav")                      # or a [N] / [1, N] 24 kHz array
    result.audio, result.text, result.words                 # [1, N] pcm, str, [Word(text, start)]

Frame policy (the official `moshi.run_inference`): the input is cut into whole 80 ms frames (a
partial last frame is dropped), each encoded by Mimi in streaming; the first frame's codes are fed
to the LM twice, since the very first step only reads initial tokens; then one LM step per frame.
Step s produces the frame the model generated at step s - max(delays); the output of step 0 is
never kept. So a Moshi input of T frames (delays at most 1) gives T output frames, output frame i
starting at i * 80 ms, aligned with the input.

Model types:
- moshi: audio and text out; the run ends with the input (`silence_tail` appends silence first,
  to let the model finish its answer).
- stt (dep_q = 0): text only. The input gets `stt_config.audio_silence_prefix_seconds` of silence
  before it and `audio_delay_seconds + 1` s after it; word times are shifted back by both.
- hibiki: after the input, one frame of codes all equal to `card` (end of input), then silence,
  until the model emits the text EOS (`tokenizer.eos_id()`); an EOS before the input ended is
  ignored with a warning. At most `HIBIKI_MAX_EXTRA_SECONDS` more than the input.

Personas (PersonaPlex, `text_prompt` / `voice_prompt`): every input's conversation starts after
the prompt phase (`openmoshi.lm.persona`), whose last frame the first step reads: no frame is fed
twice, input frame i is given to step i and output frame i is what step i returns (PersonaPlex's
own script returns the last spacer frame first, one frame later).

Several inputs run as one batch, shorter ones padded with silence; each result is trimmed to its
own length. On CUDA, Mimi's steps and the LM step run as CUDA graphs (`openmoshi.accel.cuda_graph`;
`cuda_graph=False` or OPENMOSHI_NO_CUDA_GRAPH=1 for eager), with the same tokens for the same seed.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from openmoshi.audio import SAMPLE_RATE, AudioError, load_audio, resample
from openmoshi.engine.engine import Engine
from openmoshi.engine.speed import Speed, SpeedConfig, choose
from openmoshi.engine.startup import make_fast
from openmoshi.errors import UserError
from openmoshi.inference.transcript import Piece, Word, pieces, text_of, transcript_dict, words
from openmoshi.lm.persona import Prompt, build_prompt, run_prompts, wrap_system
from openmoshi.lm.sampling import SamplingConfig
from openmoshi.loading.model import LoadedModel, load_model
from openmoshi.loading.resolve import DEFAULT_REPO, resolve_files
from openmoshi.loading.voices import load_voice
from openmoshi.mimi.codec import FRAME_SIZE

log = logging.getLogger("openmoshi.inference")

FRAME_SECONDS = FRAME_SIZE / SAMPLE_RATE  # 0.08
ENCODE_CHUNK = 10  # frames Mimi encodes per call (bounds memory on long files)
STT_TAIL_SECONDS = 1.0  # silence after audio_delay_seconds, as the official script
HIBIKI_MAX_EXTRA_SECONDS = 60.0
DEFAULT_SEED = 4242  # the official script's seed: runs are reproducible by default


@dataclass(frozen=True)
class InferenceResult:
    input_pcm: torch.Tensor  # [1, N] the input as the model heard it (24 kHz, before padding)
    audio: torch.Tensor | None  # [1, M] the model's voice at 24 kHz, None for text-only models
    text_tokens: list[int]  # one per output frame
    times: list[float]  # seconds, start of each output frame (shifted for STT, see module doc)
    pieces: list[Piece] = field(default_factory=list)
    eos: bool = False  # hibiki: the text EOS was reached

    @property
    def text(self) -> str:
        return text_of(self.pieces)

    @property
    def words(self) -> list[Word]:
        return words(self.pieces)

    def stereo(self) -> torch.Tensor:
        """[2, N]: the input on the left, the model on the right, time aligned."""
        model = self.audio if self.audio is not None else torch.zeros(1, 0)
        n = max(self.input_pcm.shape[-1], model.shape[-1])
        pad = lambda x: torch.nn.functional.pad(x, (0, n - x.shape[-1]))  # noqa: E731
        return torch.cat([pad(self.input_pcm), pad(model.to(self.input_pcm))], dim=0)


@dataclass(frozen=True)
class Progress:
    """Given to `on_step` after every LM step."""

    step: int  # steps done
    total: int | None  # steps expected (None: until EOS)
    elapsed: float  # seconds
    new_pieces: list[Piece | None]  # per input: the piece shown at this step, if any

    @property
    def rtf(self) -> float:
        """Real-time factor: compute seconds per second of audio processed (< 1: faster)."""
        return self.elapsed / max(self.step * FRAME_SECONDS, 1e-9)


def as_pcm(x, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """A file path or an array ([N], [1, N] or [C, N], any rate) -> [1, N] float32 at 24 kHz."""
    if isinstance(x, (str, Path)):
        return load_audio(x)
    pcm = torch.as_tensor(x).detach().float().cpu()
    if pcm.dim() == 1:
        pcm = pcm[None]
    if pcm.dim() != 2:
        raise AudioError(f"audio arrays must be [samples] or [channels, samples], got shape {tuple(pcm.shape)}")
    pcm = pcm.mean(0, keepdim=True)
    return resample(pcm, sample_rate, SAMPLE_RATE) if sample_rate != SAMPLE_RATE else pcm


class _Encoder:
    """Streaming Mimi codes of a growing batch signal: the inputs, then silence forever."""

    def __init__(self, engine, pcms: list[torch.Tensor]):
        self.engine = engine
        n = max(p.shape[-1] for p in pcms)
        self.pcm = torch.stack([torch.nn.functional.pad(p[0], (0, n - p.shape[-1])) for p in pcms])[:, None]
        self.codes = []  # chunks [B, K, F]
        self.done = 0  # frames encoded

    def frame(self, f: int) -> torch.Tensor:
        """codes [B, K] of encoder frame f (frames are encoded in order, in chunks)."""
        while self.done <= f:
            a, b = self.done * FRAME_SIZE, (self.done + ENCODE_CHUNK) * FRAME_SIZE
            chunk = self.pcm[..., a:b]
            chunk = torch.nn.functional.pad(chunk, (0, b - a - chunk.shape[-1]))  # silence after the inputs
            # A copy: a graph's output buffer is overwritten by the next chunk.
            self.codes.append(self.engine.encode(chunk).clone())
            self.done += ENCODE_CHUNK
        return self.codes[f // ENCODE_CHUNK][:, :, f % ENCODE_CHUNK]


@torch.no_grad()
def run(model: LoadedModel, inputs: list, sampling: SamplingConfig | None = None,
        seed: int | None = DEFAULT_SEED, silence_tail: float = 0.0, on_step=None,
        sample_rate: int = SAMPLE_RATE, cuda_graph: bool | None = None,
        cfg_coef: float = 1.0, prompt: Prompt | None = None, speed: Speed | None = None) -> list[InferenceResult]:
    """Runs the model over `inputs` (paths or arrays) as one batch; see the module docstring.
    `speed`: the paths `engine.speed.prepare` applied to `model` (None: none, CUDA graphs as
    `cuda_graph` says: None for graphs on CUDA, False for eager). `prompt`: a persona's prompt
    phase (`persona_prompt`), run before every input."""
    kind = model.config.model_type
    if kind not in POLICIES:
        raise UserError(f"model_type {kind!r} is not supported by offline inference")
    if prompt is not None and kind != "moshi":
        raise UserError(f"persona prompts are for speech-to-speech models, not {kind}")
    if silence_tail < 0:
        raise UserError(f"silence_tail must be >= 0, got {silence_tail}")
    sampling = sampling or SamplingConfig.from_gen_config(model.config.lm_gen_config)
    heard = [as_pcm(x, sample_rate) for x in inputs]  # [1, N] each
    policy = (PersonaPolicy if prompt is not None else POLICIES[kind])(model, heard, silence_tail)
    for x, p, t in zip(inputs, heard, policy.frames):
        if t == 0:
            name = x if isinstance(x, (str, Path)) else "input array"
            raise AudioError(f"{name} is too short ({p.shape[-1] / SAMPLE_RATE:.3f} s): the model needs "
                             f"at least one {FRAME_SECONDS * 1000:.0f} ms frame")
    B = len(heard)
    generator = None if seed is None else torch.Generator(model.device).manual_seed(seed)
    speed = speed or choose(model.device, SpeedConfig(cuda_graphs=cuda_graph, self_check=False))
    if kind != "hibiki" and model.lm.condition_provider is not None:  # as the official loop
        raise UserError(f"this {kind} model expects conditioning, which offline inference supports for Hibiki only")
    engine = Engine.build(model, B, speed, sampling, cfg_coef, slot_streams=False, generator=generator,
                          all_buckets=False)
    if prompt is not None:
        run_prompts(model.lm, engine.gen, [prompt] * B, generator)
    prompted = engine.gen.calls  # steps done by the prompt phase
    enc = _Encoder(engine, policy.padded)
    results = [_Output() for _ in range(B)]
    start = time.perf_counter()
    for s in range(policy.max_steps):
        if policy.finished(results):
            break
        out = engine.step(policy.codes(s, enc), position=prompted + s)
        shown: list[Piece | None] = [None] * B
        if policy.keeps(s):
            pcm = None
            if engine.dec is not None:  # a copy: a graph's output is overwritten at its next call
                pcm = engine.decode(out.audio[:, :, None]).to("cpu", copy=True)  # [B, 1, 1920]
            text = out.text.cpu().tolist()
            t_out = round(max(policy.time(s), 0.0), 3)
            for b in range(B):
                if policy.take(s, b, text[b], results[b]):
                    r = results[b]
                    r.texts.append(text[b])
                    r.times.append(t_out)
                    if pcm is not None:
                        r.audio.append(pcm[b])
                    ps = pieces([text[b]], [t_out], model.tokenizer)
                    shown[b] = ps[0] if ps else None
        if on_step:
            on_step(Progress(s + 1, policy.total, time.perf_counter() - start, shown))
    return [r.result(heard[b], model.tokenizer, engine.dec is not None) for b, r in enumerate(results)]


@dataclass
class _Output:
    """One input's outputs, as they come."""

    texts: list[int] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    audio: list[torch.Tensor] = field(default_factory=list)
    eos: bool = False
    eos_fed: bool = False  # hibiki: the end of its input went in

    def result(self, heard: torch.Tensor, tokenizer, has_audio: bool) -> InferenceResult:
        audio = (torch.cat(self.audio, dim=-1) if self.audio else torch.zeros(1, 0)) if has_audio else None
        return InferenceResult(input_pcm=heard, audio=audio, text_tokens=self.texts, times=self.times,
                               pieces=pieces(self.texts, self.times, tokenizer), eos=self.eos)


# ----------------------------------------------------------------------------- frame policies


class MoshiPolicy:
    """The official offline policy: whole frames only; the first frame fed twice (the very first step
    reads only initial tokens); step s outputs the frame generated at step s - max(delays), the
    output of step 0 never kept; an input's outputs end with its own frames (`silence_tail`
    appended first)."""

    lead = 1  # steps before input frame 1 is fed: frame 0 goes in twice

    def __init__(self, model: LoadedModel, heard: list[torch.Tensor], silence_tail: float = 0.0):
        self.model, self.device = model, model.device
        self.delay = model.lm.cfg.max_delay
        pre, post = self.padding()
        padded = [torch.nn.functional.pad(p, (pre, post + int(round(silence_tail * SAMPLE_RATE)))) for p in heard]
        self.frames = [p.shape[-1] // FRAME_SIZE for p in padded]  # whole frames only, as the official loop
        self.padded = [p[:, :t * FRAME_SIZE] for p, t in zip(padded, self.frames)]
        self.shift = 0.0  # seconds subtracted from output times

    def padding(self) -> tuple[int, int]:
        """Samples of silence before and after each input."""
        return 0, 0

    @property
    def total(self) -> int | None:
        return max(self.frames) + self.lead

    @property
    def max_steps(self) -> int:
        return self.total

    def codes(self, s: int, enc: _Encoder) -> torch.Tensor:
        """[B, K] input codes of step s."""
        return enc.frame(max(s - self.lead, 0))

    def keeps(self, s: int) -> bool:
        """Whether step s's outputs are frames of the conversation."""
        return not (self.lead and s == 0) and s >= self.delay

    def time(self, s: int) -> float:
        return (s - self.delay) * FRAME_SECONDS - self.shift

    def take(self, s: int, b: int, token: int, out: _Output) -> bool:
        return s - self.lead < self.frames[b]  # not past this input's own end (a shorter input of a batch)

    def finished(self, outputs: list[_Output]) -> bool:
        return False


class SttPolicy(MoshiPolicy):
    """Speech to text (dep_q = 0): `stt_config.audio_silence_prefix_seconds` of silence before the
    input and `audio_delay_seconds` + STT_TAIL_SECONDS after it; word times shifted back by both."""

    def padding(self) -> tuple[int, int]:
        stt = self.model.config.stt_config
        self.pre = int(stt.get("audio_silence_prefix_seconds", 0.0) * SAMPLE_RATE)
        return self.pre, int((stt.get("audio_delay_seconds", 0.0) + STT_TAIL_SECONDS) * SAMPLE_RATE)

    def __init__(self, model, heard, silence_tail=0.0):
        super().__init__(model, heard, silence_tail)
        self.shift = self.pre / SAMPLE_RATE + model.config.stt_config.get("audio_delay_seconds", 0.0)


class HibikiPolicy(MoshiPolicy):
    """Translation: after the input, one frame of codes all equal to `card` (end of input), then
    silence, until the model emits the text EOS; an EOS before the input ended is ignored with a
    warning. At most HIBIKI_MAX_EXTRA_SECONDS more than the input."""

    def __init__(self, model, heard, silence_tail=0.0):
        super().__init__(model, heard, silence_tail)
        self.eos_id = model.tokenizer.eos_id()
        self.fed = [False] * len(heard)

    @property
    def total(self) -> None:
        return None  # until EOS

    @property
    def max_steps(self) -> int:
        return max(self.frames) + 2 + int(HIBIKI_MAX_EXTRA_SECONDS / FRAME_SECONDS)

    def codes(self, s: int, enc: _Encoder) -> torch.Tensor:
        f, mimi = max(s - self.lead, 0), self.model.mimi
        rows = []
        for b, frames in enumerate(self.frames):
            if f < frames:
                rows.append(enc.frame(f)[b])
            elif f == frames:  # end of the input stream
                rows.append(torch.full((mimi.num_codebooks,), mimi.cardinality, dtype=torch.long, device=self.device))
                self.fed[b] = True
            else:  # silence, continuing the encoder's stream where the input stopped
                rows.append(enc.frame(f - 1)[b])
        return torch.stack(rows)

    def take(self, s: int, b: int, token: int, out: _Output) -> bool:
        if out.eos:
            return False
        if token == self.eos_id:
            if self.fed[b]:
                out.eos = True
            else:
                log.warning("EOS sampled before the end of the input, ignored")
        return True

    def finished(self, outputs: list[_Output]) -> bool:
        return all(o.eos for o in outputs)


class PersonaPolicy(MoshiPolicy):
    """After a persona's prompt phase (PersonaPlex), whose last frame the first step reads: no frame
    is fed twice, input frame i goes to step i and output frame i is what step i returns
    (PersonaPlex's own script returns the last spacer frame first, one frame later)."""

    lead = 0

    def __init__(self, model, heard, silence_tail=0.0):
        super().__init__(model, heard, silence_tail)
        self.delay = 0  # every step's output is kept


POLICIES = {"moshi": MoshiPolicy, "stt": SttPolicy, "hibiki": HibikiPolicy}


def persona_prompt(model: LoadedModel, text: str | None = None, voice=None) -> Prompt:
    """The prompt phase of a persona: `text` (wrapped in <system> tags) and `voice`, an audio file
    or a PersonaPlex `.pt` preset (`loading.voices`). Errors (`PromptError`, `VoiceError`) say why."""
    voice_codes = None if voice is None else load_voice(voice, model.mimi, model.lm.cfg)
    tokens = None if text is None else model.tokenizer.encode(wrap_system(text))
    return build_prompt(model.lm.cfg, voice_codes, tokens)


@dataclass(frozen=True)
class InferenceModel:
    """A loaded model with a one-call `run`; see the module docstring."""

    model: LoadedModel
    speed: Speed | None = None  # the paths applied to the model (`engine.startup`); None: none

    def run(self, inputs, sampling: SamplingConfig | None = None, greedy: bool = False,
            seed: int | None = DEFAULT_SEED, silence_tail: float = 0.0, sample_rate: int = SAMPLE_RATE,
            on_step=None, cuda_graph: bool | None = None, cfg_coef: float = 1.0,
            text_prompt: str | None = None, voice_prompt=None):
        """One input (path or array) -> InferenceResult; a list of inputs -> a list, run as one batch.
        `cuda_graph=False` runs eagerly on CUDA (default: CUDA graphs there). `cfg_coef` != 1:
        classifier-free guidance of a conditioned Hibiki ('very_good' against 'very_bad').
        `text_prompt` / `voice_prompt` (a file): a PersonaPlex persona (see `persona_prompt`)."""
        single = isinstance(inputs, (str, Path)) or (hasattr(inputs, "shape") and len(inputs.shape) <= 2)
        if greedy:
            sampling = SamplingConfig.greedy()
        prompt = None
        if text_prompt is not None or voice_prompt is not None:
            prompt = persona_prompt(self.model, text_prompt, voice_prompt)
        speed = self.speed if cuda_graph is None or self.speed is None else replace(self.speed, cuda_graphs=cuda_graph)
        out = run(self.model, [inputs] if single else list(inputs), sampling, seed, silence_tail,
                  on_step, sample_rate, cuda_graph, cfg_coef, prompt, speed)
        return out[0] if single else out

    def transcript(self, result: InferenceResult, source: str | None = None) -> dict:
        return transcript_dict(result.text_tokens, result.times, self.model.tokenizer, source)


def load(hf_repo: str | None = DEFAULT_REPO, moshi_weight=None, mimi_weight=None, tokenizer=None,
         config_path=None, lora_weight=None, device=None, dtype=None, quantize=None) -> InferenceModel:
    """Resolves (downloading if needed) and loads a model; arguments as the CLI flags."""
    files = resolve_files(hf_repo, moshi_weight, mimi_weight, tokenizer, config_path, lora_weight)
    model, speed = make_fast(load_model(files, device, dtype, quantize))
    return InferenceModel(model, speed)
