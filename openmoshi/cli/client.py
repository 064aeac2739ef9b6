"""`openmoshi client`: talk to a Moshi server (`openmoshi serve` or the official ones).

Live, through the sound card:            openmoshi client --url ws://host:8998  [--no-aec with headphones]
Headless, a file as the microphone:      openmoshi client --url ws://host:8998 --input in.wav --output out.wav
"""

from __future__ import annotations

import argparse
import sys

from openmoshi.cli.common import UsageError, existing_file, output_file

EXIT_CONNECTION = 1  # the server could not be reached, refused us, or hung up


def add_client_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "client", help="talk to a Moshi server (microphone and speaker, or files)",
        description="Talk to a Moshi server over its websocket protocol. Without --input, uses the "
        "default microphone and speaker (needs the sounddevice package and PortAudio); with --input, "
        "plays the file to the server in real time as if spoken and records what comes back. "
        "The transcript goes to stdout, messages to stderr, the latency measured with them (every 10 s "
        "live, at the end with files).",
    )
    p.add_argument("--url", default="ws://localhost:8998",
                   help="server address: ws://, wss://, http:// or https://, with or without the "
                   "/api/chat path (default: ws://localhost:8998)")
    p.add_argument("--auth-token", default=None, metavar="TOKEN",
                   help="the server's --auth-token (sent as worker_auth_id and as a Bearer header)")
    p.add_argument("--input", default=None, metavar="IN_AUDIO",
                   help="headless: an audio file (any format FFmpeg reads) to use as the microphone")
    p.add_argument("--output", default=None, metavar="OUT.wav",
                   help="where to write the server's voice (24 kHz mono wav)")
    p.add_argument("--transcript", default=None, metavar="OUT.txt", help="where to write the text")
    p.add_argument("--tail", type=float, default=2.0, metavar="SECONDS",
                   help="headless: how long to wait for the last replies after the input ends (default 2)")
    p.add_argument("--buffer", type=float, default=0.02, metavar="SECONDS",
                   help="live: the least the speaker's jitter buffer holds back; raised by 20 ms after each "
                   "underrun, lowered by 10 ms every 5 s without one (default 0.02)")
    p.add_argument("--max-lag", type=float, default=0.32, metavar="SECONDS",
                   help="live: audio queued for the speaker beyond this is dropped to catch up (default 0.32)")
    p.add_argument("--no-aec", dest="aec", action="store_false",
                   help="live: no echo cancellation (with headphones); by default the speaker's echo is "
                   "removed from the microphone by WebRTC's canceller (the livekit package)")
    p.add_argument("--quiet", action="store_true", help="do not print the transcript")
    g = p.add_argument_group("sampling (passed to the server as query parameters)")
    for name, kind in (("text_temperature", float), ("text_topk", int), ("audio_temperature", float),
                       ("audio_topk", int), ("pad_mult", float), ("text_seed", int), ("audio_seed", int),
                       ("repetition_penalty", float), ("repetition_penalty_context", int)):
        g.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, default=None, metavar="X")
    p.set_defaults(handler=client_main)


def client_main(args: argparse.Namespace) -> int:
    from openmoshi.serving.client import SAMPLING_PARAMS, ClientError, Transcript, chat_url

    try:
        chat_url(args.url)
    except ValueError as e:
        raise UsageError(str(e)) from None
    source = existing_file(args.input, "audio file") if args.input else None
    output = output_file(args.output) if args.output else None
    text_out = output_file(args.transcript) if args.transcript else None
    if args.tail < 0 or args.max_lag <= 0 or args.buffer < 0:
        raise UsageError("--tail and --buffer must be >= 0 and --max-lag > 0")
    params = {name: getattr(args, name) for name in SAMPLING_PARAMS}

    midline = [False]  # the transcript's line is open: a message starts a new line first

    def show(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()
        midline[0] = True

    transcript = Transcript(on_piece=None if args.quiet else show)

    def show_latency(report: dict) -> None:  # live, every 10 s
        if report.get("chunks"):
            lead = "\n" if midline[0] else ""
            print(f"{lead}openmoshi: {_latency_line(report)}; jitter buffer {report['buffer_ms']} ms, "
                  f"{report['underruns']} underruns", file=sys.stderr, flush=True)
            midline[0] = False
    shown = []

    def queued(position: int, length: int) -> None:  # the server repeats it every few seconds
        if shown[-1:] != [(position, length)]:
            shown.append((position, length))
            print(f"openmoshi: waiting for a free slot: position {position} of {length}", file=sys.stderr)

    try:
        result = _run(args, source, output is not None, params, transcript, queued, show_latency)
    except ClientError as e:
        print(f"openmoshi: error: {e}", file=sys.stderr)
        return EXIT_CONNECTION
    finally:
        if not args.quiet and transcript.pieces:
            print()
    for message in result.errors:
        print(f"openmoshi: the server said: {message}", file=sys.stderr)
    if output is not None:
        _save_wav(output, result.audio)
    if text_out is not None:
        text_out.write_text(result.text + "\n", encoding="utf-8")
    dropped = f", dropped {result.seconds_dropped:.2f} s to catch up" if result.seconds_dropped else ""
    print(f"openmoshi: sent {result.seconds_sent:.1f} s, received {result.seconds_received:.1f} s{dropped}",
          file=sys.stderr)
    if result.latency.get("chunks"):
        print(f"openmoshi: {_latency_line(result.latency)} over {result.latency['chunks']} chunks", file=sys.stderr)
    return 0


def _latency_line(r: dict) -> str:
    """The latency a client hears (openmoshi.serving.latency), and as heard through the speaker when known."""
    line = f"latency p50 {r['p50_ms']:.0f} ms, p90 {r['p90_ms']:.0f} ms"
    if "heard_p50_ms" in r:
        line += f"; as heard p50 {r['heard_p50_ms']:.0f} ms, p90 {r['heard_p90_ms']:.0f} ms"
    return line


def _run(args, source, record: bool, params, transcript, on_queue, on_latency):
    import asyncio

    from openmoshi.serving.client import talk_file, talk_live

    if source is None:
        print("openmoshi: connecting; speak when connected, Ctrl-C to hang up", file=sys.stderr)
        return asyncio.run(talk_live(args.url, params=params, auth_token=args.auth_token,
                                     transcript=transcript, max_lag_s=args.max_lag, buffer_s=args.buffer,
                                     record=record, on_queue=on_queue, echo_cancel=args.aec,
                                     on_latency=on_latency))
    from openmoshi.audio import load_audio
    from openmoshi.serving.opus import SAMPLE_RATE

    pcm = load_audio(source, SAMPLE_RATE)[0].numpy()  # [N]
    return asyncio.run(talk_file(args.url, pcm, params=params, auth_token=args.auth_token,
                                 transcript=transcript, tail_s=args.tail, on_queue=on_queue))


def _save_wav(path, pcm) -> None:
    """16-bit mono wav at 24 kHz, without importing torch."""
    import wave

    import numpy as np

    from openmoshi.serving.opus import SAMPLE_RATE

    data = (np.clip(pcm, -1.0, 1.0) * 32767).round().astype("<i2").tobytes()
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes(data)
