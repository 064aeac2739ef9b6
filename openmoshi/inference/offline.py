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

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from openmoshi.accel.cuda_graph import GraphedStep, graphed
from openmoshi.accel.streaming import with_fast_streaming
from openmoshi.audio import SAMPLE_RATE, AudioError, load_audio, resample
from openmoshi.inference.transcript import Piece, Word, pieces, text_of, transcript_dict, words
from openmoshi.lm.conditioners import HIBIKI_CONDITION, HIBIKI_NEGATIVE
from openmoshi.lm.generate import init_state, set_condition
from openmoshi.lm.persona import Prompt, build_prompt, run_prompts, wrap_system
from openmoshi.lm.sampling import SamplingConfig
from openmoshi.loading.model import LoadedModel, load_model
from openmoshi.loading.resolve import DEFAULT_REPO, resolve_files
from openmoshi.loading.voices import load_voice
from openmoshi.mimi.codec import FRAME_SIZE

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

    def __init__(self, mimi, pcms: list[torch.Tensor], device, cuda_graph: bool | None = None):
        self.mimi, self.device = mimi, device
        n = max(p.shape[-1] for p in pcms)
        self.pcm = torch.stack([torch.nn.functional.pad(p[0], (0, n - p.shape[-1])) for p in pcms])[:, None]
        self.state = state = mimi.init_encode_state(len(pcms))
        self.encode = graphed(lambda pcm: mimi.encode_step(pcm, state), cuda_graph, device, name="mimi_encode")
        self.codes = []  # chunks [B, K, F]
        self.done = 0  # frames encoded

    def frame(self, f: int) -> torch.Tensor:
        """codes [B, K] of encoder frame f (frames are encoded in order, in chunks)."""
        while self.done <= f:
            a, b = self.done * FRAME_SIZE, (self.done + ENCODE_CHUNK) * FRAME_SIZE
            chunk = self.pcm[..., a:b]
            chunk = torch.nn.functional.pad(chunk, (0, b - a - chunk.shape[-1]))  # silence after the inputs
            # A copy: a graph's output buffer is overwritten by the next chunk.
            self.codes.append(self.encode(chunk.to(self.device)).clone())
            self.done += ENCODE_CHUNK
        return self.codes[f // ENCODE_CHUNK][:, :, f % ENCODE_CHUNK]


@torch.no_grad()
def run(model: LoadedModel, inputs: list, sampling: SamplingConfig | None = None,
        seed: int | None = DEFAULT_SEED, silence_tail: float = 0.0, on_step=None,
        sample_rate: int = SAMPLE_RATE, cuda_graph: bool | None = None,
        cfg_coef: float = 1.0, prompt: Prompt | None = None) -> list[InferenceResult]:
    """Runs the model over `inputs` (paths or arrays) as one batch; see the module docstring.
    `cuda_graph`: None for CUDA graphs on CUDA, False for eager (see openmoshi.accel.cuda_graph).
    `prompt`: a persona's prompt phase (`persona_prompt`), run before every input."""
    lm, mimi, tok, cfg = model.lm, model.mimi, model.tokenizer, model.config
    kind = cfg.model_type
    if kind not in ("moshi", "stt", "hibiki"):
        raise ValueError(f"model_type {kind!r} is not supported by offline inference")
    sampling = sampling or SamplingConfig.from_gen_config(model.config.lm_gen_config)
    device = model.device
    heard = [as_pcm(x, sample_rate) for x in inputs]  # [1, N] each
    if silence_tail < 0:
        raise ValueError(f"silence_tail must be >= 0, got {silence_tail}")
    tail = int(round(silence_tail * SAMPLE_RATE))
    pre = post = 0
    if kind == "stt":
        pre = int(cfg.stt_config.get("audio_silence_prefix_seconds", 0.0) * SAMPLE_RATE)
        post = int((cfg.stt_config.get("audio_delay_seconds", 0.0) + STT_TAIL_SECONDS) * SAMPLE_RATE)
    padded = [torch.nn.functional.pad(p, (pre, post + tail)) for p in heard]
    frames = [p.shape[-1] // FRAME_SIZE for p in padded]  # whole frames only, as the official loop
    for x, p, t in zip(inputs, heard, frames):
        if t == 0:
            name = x if isinstance(x, (str, Path)) else "input array"
            raise AudioError(f"{name} is too short ({p.shape[-1] / SAMPLE_RATE:.3f} s): the model needs "
                             f"at least one {FRAME_SECONDS * 1000:.0f} ms frame")
    padded = [p[:, :t * FRAME_SIZE] for p, t in zip(padded, frames)]

    B, T, md = len(padded), max(frames), lm.cfg.max_delay
    generator = None
    if seed is not None:
        generator = torch.Generator(device).manual_seed(seed)
    state = init_state(lm, B, sampling, cfg_coef=cfg_coef)
    if lm.condition_provider is not None:
        if kind != "hibiki":  # as the official loop: only Hibiki has a known condition
            raise ValueError(f"this {kind} model expects conditioning, which offline inference supports "
                             "for Hibiki only")
        negative = lm.condition_sum([HIBIKI_NEGATIVE] * B) if cfg_coef != 1.0 else None
        set_condition(state, lm.condition_sum([HIBIKI_CONDITION] * B), negative=negative)
    lead = 1  # the first frame is fed twice (the very first step reads only initial tokens)
    if prompt is not None:
        if kind != "moshi":
            raise ValueError(f"persona prompts are for speech-to-speech models, not {kind}")
        run_prompts(lm, state, [prompt] * B, generator)
        lead, md = 0, 0  # the prompt's last frame is read first; every step's output is kept
    prompted = state.calls  # steps done by the prompt phase
    enc = _Encoder(mimi, padded, device, cuda_graph)
    lm_step = GraphedStep(lm, state, cuda_graph, generator)  # outputs valid until its next call
    decode = None
    if lm.cfg.dep_q:
        dec = mimi.init_decode_state(B)
        decode = graphed(lambda codes: mimi.decode_step(codes, dec), cuda_graph, device, name="mimi_decode")
    hibiki = kind == "hibiki"
    total = None if hibiki else T + lead
    max_steps = T + 2 + int(HIBIKI_MAX_EXTRA_SECONDS / FRAME_SECONDS) if hibiki else T + lead
    eos_id = tok.eos_id()
    eos = [False] * B
    eos_fed = [False] * B
    texts: list[list[int]] = [[] for _ in range(B)]
    times: list[list[float]] = [[] for _ in range(B)]
    audio: list[list[torch.Tensor]] = [[] for _ in range(B)]
    shift = (pre / SAMPLE_RATE + cfg.stt_config.get("audio_delay_seconds", 0.0)) if kind == "stt" else 0.0
    start = time.perf_counter()
    for s in range(max_steps):
        if hibiki and all(eos):
            break
        f = max(s - lead, 0)  # the input frame of step s: without a prompt, frame 0 is fed twice
        codes = []
        for b in range(B):
            if not hibiki or f < frames[b]:
                codes.append(enc.frame(f)[b])
            elif f == frames[b]:  # end of the input stream
                codes.append(torch.full((mimi.num_codebooks,), mimi.cardinality, dtype=torch.long, device=device))
                eos_fed[b] = True
            else:  # silence, continuing the encoder's stream where the input stopped
                codes.append(enc.frame(f - 1)[b])
        out = lm_step(torch.stack(codes), position=prompted + s)
        if (lead and s == 0) or s < md:
            if on_step:
                on_step(Progress(s + 1, total, time.perf_counter() - start, [None] * B))
            continue
        pcm = None
        if decode is not None:  # a copy: a graph's output is overwritten at its next call
            pcm = decode(out.audio[:, :, None]).to("cpu", copy=True)  # [B, 1, 1920]
        text = out.text.cpu().tolist()
        shown: list[Piece | None] = [None] * B
        t_out = (s - md) * FRAME_SECONDS - shift
        for b in range(B):
            if hibiki:
                if eos[b]:
                    continue
                if text[b] == eos_id:
                    if eos_fed[b]:
                        eos[b] = True
                    else:
                        print("openmoshi: warning: EOS sampled before the end of the input, ignored")
            elif s - lead >= frames[b]:  # past this input's own end (shorter input in a batch)
                continue
            texts[b].append(text[b])
            times[b].append(round(max(t_out, 0.0), 3))
            if pcm is not None:
                audio[b].append(pcm[b])
            ps = pieces([text[b]], [times[b][-1]], tok)
            shown[b] = ps[0] if ps else None
        if on_step:
            on_step(Progress(s + 1, total, time.perf_counter() - start, shown))
    results = []
    for b in range(B):
        pcm = torch.cat(audio[b], dim=-1) if decode is not None and audio[b] else (
            torch.zeros(1, 0) if decode is not None else None)
        results.append(InferenceResult(input_pcm=heard[b], audio=pcm, text_tokens=texts[b], times=times[b],
                                       pieces=pieces(texts[b], times[b], tok), eos=eos[b]))
    return results


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
        out = run(self.model, [inputs] if single else list(inputs), sampling, seed, silence_tail,
                  on_step, sample_rate, cuda_graph, cfg_coef, prompt)
        return out[0] if single else out

    def transcript(self, result: InferenceResult, source: str | None = None) -> dict:
        return transcript_dict(result.text_tokens, result.times, self.model.tokenizer, source)


def load(hf_repo: str | None = DEFAULT_REPO, moshi_weight=None, mimi_weight=None, tokenizer=None,
         config_path=None, lora_weight=None, device=None, dtype=None, quantize=None) -> InferenceModel:
    """Resolves (downloading if needed) and loads a model; arguments as the CLI flags."""
    files = resolve_files(hf_repo, moshi_weight, mimi_weight, tokenizer, config_path, lora_weight)
    return InferenceModel(with_fast_streaming(load_model(files, device, dtype, quantize)))
