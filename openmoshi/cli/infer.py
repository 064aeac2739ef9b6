"""`openmoshi infer INPUT... -o OUT`: run the model over recorded audio (see openmoshi.inference.offline).

Output files: one input writes OUT; several inputs write OUT-0.wav, OUT-1.wav, ... (as the
official script), or DIR/<input name>.wav when OUT is an existing folder. `--transcript` writes
one JSON object (a list of them for several inputs) with the text, words and pieces with their
start times. The text of the first input is printed live; on a terminal a progress line shows
the real-time factor (compute time / audio time), otherwise a summary line ends the run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from openmoshi.cli.common import (UsageError, add_model_args, check_cfg_coef, finite_float, fits, positive_int,
                                  resolve_model)
from openmoshi.loading.resolve import resolve_device, resolve_dtype

BAR_WIDTH = 24
TEXT_TAIL = 40  # characters of live text on the progress line


def _non_negative(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not v >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return v


def add_infer_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "infer", help="run the model offline on audio files",
        description="Run Moshi (or an STT / Hibiki model) on recorded audio with the official offline "
        "frame policy. Inputs in any format FFmpeg reads, at any rate; several inputs run as one batch.")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="audio files (wav, flac, mp3, ogg, ...)")
    p.add_argument("-o", "--output", metavar="OUT", help="output wav (24 kHz), or a folder for several inputs")
    p.add_argument("--stereo", action="store_true", help="write the input on the left, the model on the right")
    p.add_argument("--float32", action="store_true", help="write 32-bit float wav instead of 16-bit PCM")
    p.add_argument("--transcript", metavar="FILE.json", help="write the model's text with word start times")
    p.add_argument("--silence-tail", type=_non_negative, default=0.0, metavar="SECONDS",
                   help="append this much silence to each input to let the model finish")
    s = p.add_argument_group("sampling (defaults: the checkpoint's lm_gen_config, else 0.8/250 audio, 0.7/25 text)")
    s.add_argument("--temp", type=_non_negative, default=None, help="audio temperature")
    s.add_argument("--temp-text", type=_non_negative, default=None, help="text temperature")
    s.add_argument("--top-k", type=positive_int, default=None, help="audio top-k")
    s.add_argument("--top-k-text", type=positive_int, default=None, help="text top-k")
    s.add_argument("--greedy", action="store_true", help="argmax decoding (temperatures 0)")
    s.add_argument("--seed", type=int, default=None, help="random seed (default 4242, as the official script)")
    s.add_argument("--cfg-coef", type=finite_float, default=1.0, metavar="C",
                   help="classifier-free guidance of a conditioned Hibiki ('very_good' against "
                        "'very_bad'; default 1: none), as the official --cfg-coef")
    r = p.add_argument_group("persona (PersonaPlex checkpoints, e.g. --hf-repo nvidia/personaplex-7b-v1)")
    r.add_argument("--text-prompt", metavar="TEXT", help="the persona's role, wrapped in <system> tags")
    r.add_argument("--voice-prompt", metavar="FILE", help="the persona's voice: an audio file or a PersonaPlex .pt preset")
    p.add_argument("-q", "--quiet", action="store_true", help="print neither the text nor the progress")
    p.add_argument("--no-cuda-graph", action="store_true",
                   help="run eagerly on CUDA instead of as CUDA graphs (also: environment OPENMOSHI_NO_CUDA_GRAPH=1)")
    add_model_args(p)
    p.set_defaults(handler=infer)


def _outputs(out: str, inputs: list[str]) -> list[Path]:
    path = Path(out)
    if len(inputs) == 1 and not path.is_dir():
        paths = [path]
    elif path.is_dir():
        stems = [Path(x).stem for x in inputs]
        paths = [path / (f"{s}.wav" if stems.count(s) == 1 else f"{s}-{i}.wav") for i, s in enumerate(stems)]
    else:
        paths = [path.with_name(f"{path.stem}-{i}{path.suffix or '.wav'}") for i in range(len(inputs))]
    for p in paths:
        if not p.resolve().parent.is_dir():
            raise UsageError(f"cannot write {p}: folder {p.parent} does not exist")
    return paths


class _Printer:
    """Live text of the first input and a progress line (terminal) or a summary line."""

    def __init__(self, quiet: bool):
        self.quiet, self.tty = quiet, sys.stderr.isatty()
        self.text, self.last = "", None

    def __call__(self, progress) -> None:
        self.last = progress
        piece = progress.new_pieces[0] if progress.new_pieces else None
        if piece is not None:
            self.text += piece.text
            if not self.quiet and not self.tty:
                print(piece.text, end="", flush=True)
        if self.quiet or not self.tty:
            return
        seconds = progress.step * 0.08
        if progress.total:
            done = int(BAR_WIDTH * progress.step / progress.total)
            bar = f"[{'#' * done}{'.' * (BAR_WIDTH - done)}] {100 * progress.step // progress.total:3d}%"
        else:
            bar = f"[step {progress.step}]"
        tail = self.text.strip()[-TEXT_TAIL:]
        print(f"\r{bar} {seconds:6.1f} s  RTF {progress.rtf:5.2f}  {tail}\033[K", end="", file=sys.stderr, flush=True)

    def finish(self) -> None:
        if self.quiet:
            return
        if self.tty:
            print(file=sys.stderr)
            print(self.text.strip())
        else:
            print()
        if self.last is not None:
            p = self.last
            print(f"openmoshi: {p.step} steps, {p.step * 0.08:.1f} s of audio in {p.elapsed:.1f} s, "
                  f"real-time factor {p.rtf:.2f}", file=sys.stderr)


def infer(args: argparse.Namespace) -> int:
    for x in args.inputs:
        if not Path(x).is_file():
            raise UsageError(f"input {x} {'is not a file' if Path(x).exists() else 'does not exist'}")
    if args.output is None and args.transcript is None:
        raise UsageError("nothing to write: give -o OUT.wav and/or --transcript FILE.json")
    outputs = _outputs(args.output, args.inputs) if args.output else None
    if args.transcript and not Path(args.transcript).resolve().parent.is_dir():
        raise UsageError(f"cannot write {args.transcript}: its folder does not exist")

    from dataclasses import replace

    from openmoshi.audio import SAMPLE_RATE, save_wav
    from openmoshi.engine.speed import SpeedConfig
    from openmoshi.engine.startup import start
    from openmoshi.inference.offline import DEFAULT_SEED, InferenceModel, run
    from openmoshi.inference.transcript import write_json
    from openmoshi.lm.sampling import SamplingConfig

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    check_memory = fits(args, "openmoshi infer", device, dtype, args.quantize, sessions=len(args.inputs),
                        cfg_coef=args.cfg_coef)

    def before_download(config) -> None:
        if config.model_type == "tts" or config.lm.cross_attention:  # before its weights are fetched
            raise UsageError("this is a Kyutai TTS model, which speaks text: use 'openmoshi tts TEXT -o OUT.wav --voice V'")
        check_memory(config)

    files = resolve_model(args, before_download)
    check_cfg_coef(files.config, args.cfg_coef)
    if outputs and files.config.lm.dep_q == 0:
        raise UsageError(f"this model ({files.config.model_type}) writes no audio: use --transcript FILE.json")
    fast, speed = start(files, device, dtype, args.quantize, SpeedConfig(cuda_graphs=False if args.no_cuda_graph else None))
    model = InferenceModel(fast, speed)
    sampling = SamplingConfig.greedy() if args.greedy else SamplingConfig.from_gen_config(model.model.config.lm_gen_config)
    overrides = {k: getattr(args, k) for k in ("temp", "temp_text", "top_k", "top_k_text")
                 if getattr(args, k) is not None}
    sampling = replace(sampling, **overrides)
    prompt = None
    if args.text_prompt is not None or args.voice_prompt is not None:
        from openmoshi.inference.offline import persona_prompt
        from openmoshi.lm.persona import PromptError
        from openmoshi.loading.voices import VoiceError

        try:
            prompt = persona_prompt(fast, args.text_prompt, args.voice_prompt)
        except (PromptError, VoiceError) as e:
            raise UsageError(str(e)) from None
    printer = _Printer(args.quiet)
    results = run(fast, list(args.inputs), sampling, DEFAULT_SEED if args.seed is None else args.seed,
                  args.silence_tail, printer, cfg_coef=args.cfg_coef, prompt=prompt, speed=speed)
    printer.finish()
    for result, path in zip(results, outputs or []):
        save_wav(path, result.stereo() if args.stereo else result.audio, SAMPLE_RATE, float32=args.float32)
    if args.transcript:
        data = [model.transcript(r, x) for r, x in zip(results, args.inputs)]
        write_json(args.transcript, data[0] if len(data) == 1 else data)
    return 0
