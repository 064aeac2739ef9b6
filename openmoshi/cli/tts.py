"""`openmoshi tts`: Kyutai TTS, text to speech (see openmoshi.inference.tts).

    openmoshi tts "Hello world." -o hello.wav --voice expresso/ex03-ex01_happy_001_channel1_334s.wav
    echo "Hello." | openmoshi tts - -o hello.wav --voice VOICE       # text from stdin
    openmoshi tts --text-file story.txt -o story.wav --voice VOICE
    openmoshi tts --jsonl requests.jsonl -o tts-outputs/             # moshi-tts's batches

A text is one turn of one speaker. A JSONL file has one request per line, `{"turns": [...],
"voices": [...], "id": "name"}` as `moshi-tts` reads them (turns alternate between the voices,
main first), and writes DIR/<id>.wav and DIR/<id>.json (word timings), `--batch-size` requests
at a time. The defaults are `moshi-tts`'s: kyutai/tts-1.6b-en_fr, voices from kyutai/tts-voices,
temperature 0.6, cfg coefficient 2, 32 codebooks (at most the model's). Word timings are printed
(`start-end word`, seconds) and written with `--words FILE.json`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from openmoshi.cli.common import UsageError, add_model_args, finite_float, fits, non_negative_int, positive_int, resolve_model
from openmoshi.loading.resolve import resolve_device, resolve_dtype

DEFAULT_TTS_REPO = "kyutai/tts-1.6b-en_fr"  # as openmoshi.inference.tts (not imported: --help stays light)
DEFAULT_VOICE_REPO = "kyutai/tts-voices"
DEFAULT_OUT_FOLDER = "tts-outputs"


def add_tts_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "tts", help="text to speech with a Kyutai TTS model",
        description="Speak text with a Kyutai TTS model (delayed streams), as moshi-tts: a text from the "
        "command line, a file or stdin, or JSONL batches of requests.")
    p.add_argument("text", nargs="?", metavar="TEXT", help="the text to speak ('-': read it from stdin)")
    p.add_argument("--text-file", metavar="FILE", help="read the text to speak from FILE")
    p.add_argument("--jsonl", metavar="FILE", help="requests, one JSON object per line: "
                   '{"turns": [...], "voices": [...], "id": "name"} (\'-\': stdin)')
    p.add_argument("-o", "--output", metavar="OUT", help="output wav for a text; output folder for --jsonl "
                   f"(default {DEFAULT_OUT_FOLDER})")
    p.add_argument("--voice", action="append", metavar="NAME_OR_FILE",
                   help="the voice: a name in --voice-repo, a local file, or hf://OWNER/REPO/FILE")
    p.add_argument("--voice-repo", default=DEFAULT_VOICE_REPO, metavar="REPO",
                   help=f"Hugging Face repo or local folder of the voices (default {DEFAULT_VOICE_REPO})")
    p.add_argument("--words", metavar="FILE.json", help="write the word timings (a text's) as JSON")
    g = p.add_argument_group("generation (defaults: moshi-tts's)")
    g.add_argument("--nq", type=positive_int, default=32, help="audio codebooks to generate (at most the model's; default 32)")
    g.add_argument("--temp", type=finite_float, default=0.6, help="text and audio temperature (default 0.6)")
    g.add_argument("--greedy", action="store_true", help="argmax decoding (temperature 0)")
    g.add_argument("--cfg-coef", type=finite_float, default=2.0, metavar="C",
                   help="classifier-free guidance coefficient (default 2; a CFG-distilled model takes 1.0 to 4.0 "
                        "in steps of 0.5)")
    g.add_argument("--seed", type=int, default=None, help="random seed (default: none)")
    g.add_argument("--max-padding", type=positive_int, default=8, help="most padding steps in a row (default 8)")
    g.add_argument("--initial-padding", type=non_negative_int, default=2, help="padding steps at the start (default 2)")
    g.add_argument("--final-padding", type=non_negative_int, default=4, help="steps after the last word (default 4)")
    g.add_argument("--padding-bonus", type=finite_float, default=0.0,
                   help="added to the padding logit, -2..2: positive speaks slower (default 0)")
    g.add_argument("--padding-between", type=non_negative_int, default=1,
                   help="padding forced between words (default 1)")
    g.add_argument("--batch-size", type=positive_int, default=32, help="requests generated together (default 32)")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    add_model_args(p)
    for action in p._actions:  # a TTS model by default, as moshi-tts
        if action.dest == "hf_repo":
            action.default = DEFAULT_TTS_REPO
            action.help = f"Hugging Face repo id, or a local folder with the same files (default {DEFAULT_TTS_REPO})"
    p.set_defaults(handler=tts)


def _read_text(args) -> str:
    if args.text_file is not None:
        path = Path(args.text_file)
        if not path.is_file():
            raise UsageError(f"--text-file {args.text_file} {'is not a file' if path.exists() else 'does not exist'}")
        try:
            return path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise UsageError(f"--text-file {args.text_file} is not UTF-8 text") from None
    return sys.stdin.read() if args.text == "-" else args.text


def _requests(args) -> list:
    """The requests of the command line, checked before any model is loaded."""
    from openmoshi.inference.tts import RequestError, TTSRequest

    given = [x for x in (args.text is not None, args.text_file is not None, args.jsonl is not None) if x]
    if len(given) != 1:
        raise UsageError("give one input: TEXT, '-' (stdin), --text-file FILE or --jsonl FILE")
    if args.jsonl is not None:
        if args.voice:
            raise UsageError("--voice is for a text; the voices of --jsonl requests are in each line")
        if args.jsonl == "-":
            lines, name = sys.stdin.read().splitlines(), "stdin"
        else:
            path = Path(args.jsonl)
            if not path.is_file():
                raise UsageError(f"--jsonl {args.jsonl} {'is not a file' if path.exists() else 'does not exist'}")
            lines, name = path.read_text(encoding="utf-8").splitlines(), args.jsonl
        requests = []
        for i, line in enumerate(lines, 1):
            if line.strip():
                requests.append(TTSRequest.from_json(line, f"{name} line {i}"))
        if not requests:
            raise UsageError(f"--jsonl {name} has no requests")
        ids = [r.id for r in requests]
        dup = next((x for x in ids if ids.count(x) > 1), None)
        if dup is not None:
            raise RequestError(f"{name}: id {dup!r} is used twice (each request writes <id>.wav)")
        return requests
    text = _read_text(args)
    if not text.strip():
        raise UsageError("the text to speak is empty")
    if not args.voice:
        raise UsageError("give a voice: --voice NAME (from --voice-repo, e.g. "
                         "expresso/ex03-ex01_happy_001_channel1_334s.wav) or --voice FILE")
    return [TTSRequest((" ".join(text.split()),), tuple(args.voice), Path(args.output or "tts").stem)]


def tts(args: argparse.Namespace) -> int:
    requests = _requests(args)
    if args.jsonl is None:
        if args.output is None:
            raise UsageError("give the output wav: -o OUT.wav")
        out = Path(args.output)
        if out.is_dir() or not out.resolve().parent.is_dir():
            raise UsageError(f"cannot write {args.output}: " + ("it is a folder" if out.is_dir()
                                                                  else f"folder {out.parent} does not exist"))
    else:
        out = Path(args.output or DEFAULT_OUT_FOLDER)
        if out.exists() and not out.is_dir():
            raise UsageError(f"-o {out}: for --jsonl, the output is a folder")
    if args.words and not Path(args.words).resolve().parent.is_dir():
        raise UsageError(f"cannot write {args.words}: its folder does not exist")

    import torch

    from openmoshi.audio import save_wav
    from openmoshi.inference.tts import load_tts
    from openmoshi.lm.tts import TTSSettings, tts_spec

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    check_memory = fits(args, "openmoshi tts", device, dtype, args.quantize)

    def before_download(config) -> None:
        tts_spec(config)  # not a TTS model: say so before fetching its weights
        check_memory(config)

    files = resolve_model(args, before_download)
    model = load_tts(files, device, dtype, voice_repo=args.voice_repo, quantize=args.quantize)
    spec = model.spec
    if spec.cfg_values and args.cfg_coef not in spec.cfg_values:
        raise UsageError(f"--cfg-coef {args.cfg_coef}: this model was trained with CFG distillation and takes "
                         f"one of {', '.join(str(v) for v in spec.cfg_values)}")
    settings = TTSSettings(n_q=args.nq, temp=0.0 if args.greedy else args.temp, cfg_coef=args.cfg_coef,
                           max_padding=args.max_padding, initial_padding=args.initial_padding,
                           final_padding=args.final_padding, padding_between=args.padding_between,
                           padding_bonus=args.padding_bonus)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    if args.jsonl is not None:
        out.mkdir(parents=True, exist_ok=True)
    all_timings = []
    for i in range(0, len(requests), args.batch_size):
        batch = requests[i:i + args.batch_size]
        outputs = model.synthesize(batch, settings, seed=args.seed)
        for o in outputs:
            path = out if args.jsonl is None else out / f"{o.id}.wav"
            save_wav(path, o.pcm, model.model.mimi.sample_rate)
            timings = o.timings()
            all_timings.append(timings)
            if args.jsonl is not None:
                (out / f"{o.id}.json").write_text(json.dumps(timings, indent=1) + "\n")
            if not args.quiet:
                for w in o.words:
                    end = "?" if w.end is None else f"{w.end:.2f}"
                    print(f"{w.start:6.2f}-{end:>6} {w.text}")
                note = "" if o.finished else " (the text did not finish: too long for max_gen_length)"
                print(f"openmoshi: wrote {path} ({o.pcm.shape[-1] / model.model.mimi.sample_rate:.2f} s){note}",
                      file=sys.stderr)
    if args.words:
        Path(args.words).write_text(json.dumps(all_timings[0] if len(all_timings) == 1 else all_timings, indent=1) + "\n")
    return 0
