"""The server as an ASGI application (Starlette), and its runner on uvicorn.

    app = asgi_app(server)                  # the same app for uvicorn and for Ray Serve's ingress
    runner = Runner(server)                 # openmoshi serve: uvicorn on a socket bound beforehand
    await runner.start(sock, ssl_context)   # the model loop first, then accepting
    await runner.stop()                     # drain (conversations may end), then stop

Routes: `/api/chat` (websocket, the official protocol), `/v1/realtime` (websocket, the OpenAI Realtime
API, see `realtime`), `/api/asr-streaming` (websocket, moshi-server's speech to text, for an STT
model, see `asr`), `/api/tts_streaming` (websocket, and POST for a WAV: moshi-server's text to
speech, for a TTS model, see `tts`), `/health`, `/metrics` (Prometheus), `/api/voices` (the persona voices, JSON),
and the web UI at `/`. What a conversation
does is `server.MoshiServer.chat`, fed through `StarletteSocket`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

from starlette.applications import Starlette
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from openmoshi.serving import protocol
from openmoshi.serving.asr import PATH as ASR_PATH
from openmoshi.serving.asr import AsrProtocol
from openmoshi.serving.tts import PATH as TTS_PATH
from openmoshi.serving.tts import TtsProtocol, post_wav
from openmoshi.serving.personas import VOICES_ROUTE
from openmoshi.serving.realtime.protocol import RealtimeProtocol, realtime_auth
from openmoshi.serving.hosting import ModelServers
from openmoshi.serving.server import MoshiServer
from openmoshi.serving.session import CLOSE_NORMAL

# Messages a little over the protocol limit still reach `protocol.parse` (and get an error reply);
# far larger ones are refused by uvicorn itself with close code 1009.
MAX_FRAME_BYTES = 4 * protocol.MAX_MESSAGE_BYTES


class StarletteSocket:
    """`server.Socket` over a Starlette websocket: send failures are ConnectionErrors, a closed
    connection reads as None, closing twice is harmless."""

    def __init__(self, ws: WebSocket):
        self.ws = ws
        self.closed = False

    async def send(self, data: bytes | str) -> None:
        if self.closed:
            raise ConnectionError("the websocket is closed")
        try:
            if isinstance(data, str):
                await self.ws.send_text(data)
            else:
                await self.ws.send_bytes(data)
        except (WebSocketDisconnect, RuntimeError, OSError) as e:
            self.closed = True
            raise ConnectionError(str(e) or type(e).__name__) from None

    async def receive(self) -> bytes | str | None:
        if self.closed:
            return None
        try:
            message = await self.ws.receive()
        except (WebSocketDisconnect, RuntimeError, OSError):
            message = {"type": "websocket.disconnect"}
        if message["type"] == "websocket.disconnect":
            self.closed = True
            return None
        if message.get("bytes") is not None:
            return message["bytes"]
        return message.get("text") or ""

    async def close(self, code: int = CLOSE_NORMAL, reason: str = "") -> None:
        if self.closed:
            return
        self.closed = True
        if self.ws.application_state != WebSocketState.DISCONNECTED:
            with contextlib.suppress(RuntimeError, OSError, WebSocketDisconnect):
                await self.ws.close(code, reason)


def asgi_app(server: MoshiServer | ModelServers, lifespan: bool = True, on_start=None, health=None) -> Starlette:
    """The ASGI app of `server`, or of several models' servers (`hosting.ModelServers`: each
    endpoint goes to the server whose model speaks it). With `lifespan`, the app starts the model loop, and at shutdown
    drains (conversations get the reconnect message) and stops it, as a Ray Serve replica needs;
    `Runner` does both itself (lifespan=False). `on_start`: a coroutine function run once started.
    `health`: a coroutine function giving /health's (status, body) instead of `server.health()`
    (a cluster replica adds who it is and whether the whole cluster is routable yet)."""

    servers = hosted(server)
    speech, stt, tts = servers.for_kind("speech"), servers.for_kind("stt"), servers.for_kind("tts")

    async def chat(ws: WebSocket) -> None:
        await ws.accept()
        peer = ws.client.host if ws.client else "?"
        await speech.chat(StarletteSocket(ws), ws.query_params, ws.headers, peer)

    async def realtime(ws: WebSocket) -> None:
        headers, subprotocol = realtime_auth(ws.headers)
        await ws.accept(subprotocol=subprotocol)
        peer = ws.client.host if ws.client else "?"
        await speech.chat(StarletteSocket(ws), ws.query_params, headers, peer,
                          RealtimeProtocol(ws.query_params, stt if stt.model_kind == "stt" else None))

    async def asr(ws: WebSocket) -> None:
        await ws.accept()
        peer = ws.client.host if ws.client else "?"
        await stt.chat(StarletteSocket(ws), ws.query_params, ws.headers, peer, AsrProtocol.for_server(stt))

    async def tts_stream(ws: WebSocket) -> None:
        await ws.accept()
        peer = ws.client.host if ws.client else "?"
        await tts.chat(StarletteSocket(ws), ws.query_params, ws.headers, peer, TtsProtocol.for_server(tts, ws.query_params))

    async def tts_post(request):
        if tts.model_kind != "tts":
            return JSONResponse({"error": "this server runs no text-to-speech model"}, status_code=404)
        return await post_wav(tts, request)

    async def health_route(_request):
        status, body = await health() if health is not None else servers.health()
        return JSONResponse(body, status_code=status)

    async def voices(_request):
        return JSONResponse({"voices": servers.personas.voices()})

    async def metrics(_request):
        return PlainTextResponse(servers.metrics(), headers={"X-Content-Type-Options": "nosniff"})

    static = servers.config.static_dir
    index = None if static is None else Path(static) / "index.html"

    async def root(_request):
        if index is not None and index.is_file():
            return FileResponse(index)
        return PlainTextResponse("openmoshi server: websocket at /api/chat\n")

    routes = [WebSocketRoute("/api/chat", chat), WebSocketRoute("/v1/realtime", realtime),
              WebSocketRoute(ASR_PATH, asr), WebSocketRoute(TTS_PATH, tts_stream), Route(TTS_PATH, tts_post, methods=["POST"]),
              Route("/health", health_route),
              Route("/metrics", metrics), Route(VOICES_ROUTE, voices), Route("/", root)]
    if index is not None and Path(static).is_dir():
        routes.append(Mount("/", StaticFiles(directory=str(static)), name="static"))

    @contextlib.asynccontextmanager
    async def life(_app):
        if lifespan:
            await servers.start()
        if on_start is not None:
            await on_start()
        try:
            yield
        finally:
            if lifespan:
                try:
                    await servers.drain()
                finally:
                    await servers.stop()

    return Starlette(routes=routes, lifespan=life)


def hosted(server: MoshiServer | ModelServers) -> ModelServers:
    return server if isinstance(server, ModelServers) else ModelServers([server])


class Runner:
    """`server`'s ASGI app (or that of several models' servers) on uvicorn, in the running event
    loop, on a socket bound beforehand."""

    def __init__(self, server: MoshiServer | ModelServers):
        self.server = hosted(server)
        self._uvicorn = None
        self._task: asyncio.Task | None = None

    async def start(self, sock, ssl_context=None) -> None:
        """Starts the model loop, then accepts on `sock` (listening already)."""
        import uvicorn

        await self.server.start()
        cfg = self.server.config
        config = uvicorn.Config(asgi_app(self.server, lifespan=False), lifespan="off", log_config=None,
                                access_log=False, ws_max_size=MAX_FRAME_BYTES, ws_ping_interval=cfg.heartbeat,
                                ws_ping_timeout=cfg.heartbeat, timeout_graceful_shutdown=1)
        config.load()
        config.ssl = ssl_context  # uvicorn's own context comes from files; ours is ready
        for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):  # our own events say it once
            logging.getLogger(name).setLevel(logging.WARNING)
        self._uvicorn = uvicorn.Server(config)
        self._uvicorn.install_signal_handlers = lambda: None  # the caller decides when to stop
        self._task = asyncio.create_task(self._uvicorn.serve(sockets=[sock]))
        while not self._uvicorn.started:
            if self._task.done():
                await self._task  # raises what made it fail
                raise RuntimeError("the web server stopped while starting")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        """Lets the conversations end (`shutdown_grace`), closes the rest, stops serving and the model loop."""
        try:
            await self.server.drain()
        finally:
            if self._uvicorn is not None:
                self._uvicorn.should_exit = True
                await self._task
            await self.server.stop()
