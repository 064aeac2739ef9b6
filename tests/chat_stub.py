"""A stand-in for the Moshi server in the client and browser tests: it speaks the `/api/chat`
protocol, echoes the caller's voice back (one 80 ms frame out per 80 ms frame in, like a model
step) and sends a text piece every few frames. With `lag_frames=1` it answers frame k once frame k + 1
is in, as a real server does (its first step answers nothing), and `answer_after_s` later: the
latency a client should measure is then `answer_after_s` plus the network. It serves the web UI at `/` like the real server.

It knows nothing about models, so the UI and client tests check the wire and the audio path and
not the server; `tests/test_server*.py` test the server."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from aiohttp import WSMsgType, web

from openmoshi.serving import protocol
from openmoshi.serving.opus import OpusDecoder, OpusEncoder

FRAME = 1920
WEB_DIR = Path(__file__).resolve().parent.parent / "openmoshi" / "serving" / "web"


@dataclass
class StubLog:
    """What the stub saw, for the test to check."""

    connections: int = 0
    query: list[dict] = field(default_factory=list)
    samples_in: int = 0  # decoded samples received
    peak_in: float = 0.0
    frames_out: int = 0
    pings: int = 0


class ChatStub:
    def __init__(self, text_every: int = 5, busy: bool = False, auth_token: str | None = None,
                 queue: int = 0, queue_interval: float = 0.5, lag_frames: int = 0, answer_after_s: float = 0.0):
        self.text_every = text_every
        self.lag_frames, self.answer_after_s = lag_frames, answer_after_s
        self.busy = busy
        self.queue, self.queue_interval = queue, queue_interval  # a caller waits at places queue..1
        self.auth_token = auth_token
        self.log = StubLog()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/api/chat", self.chat)
        app.router.add_get("/", self.index)
        app.router.add_static("/", WEB_DIR)
        return app

    async def index(self, request: web.Request) -> web.FileResponse:
        return web.FileResponse(WEB_DIR / "index.html")

    async def chat(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self.log.connections += 1
        self.log.query.append(dict(request.query))
        if self.auth_token is not None and request.query.get("worker_auth_id") != self.auth_token:
            await ws.send_bytes(protocol.encode_error("authentication failed"))
            await ws.close()
            return ws
        if self.busy:
            await ws.send_bytes(protocol.encode_error("server busy: all sessions are taken"))
            await ws.close()
            return ws
        for position in range(self.queue, 0, -1):
            for _ in range(2):  # told twice, as the server repeats it every few seconds
                await ws.send_bytes(protocol.encode_queue_position(position, position))
                await asyncio.sleep(self.queue_interval / 2)
        await ws.send_bytes(protocol.encode_handshake())
        decoder, encoder = OpusDecoder(), OpusEncoder()
        pending = np.zeros(0, np.float32)
        held: list[np.ndarray] = []  # frames in, not answered yet (lag_frames)
        outbox: asyncio.Queue = asyncio.Queue()  # (when due, message), in order

        async def send_later() -> None:
            loop = asyncio.get_running_loop()
            while True:
                due, data = await outbox.get()
                await asyncio.sleep(max(0.0, due - loop.time()))
                if ws.closed:
                    return
                await ws.send_bytes(data)

        async def send(data: bytes) -> None:
            if self.answer_after_s > 0:
                outbox.put_nowait((asyncio.get_running_loop().time() + self.answer_after_s, data))
            else:
                await ws.send_bytes(data)

        sender = asyncio.create_task(send_later())
        try:
            async for msg in ws:
                if msg.type != WSMsgType.BINARY:
                    break
                m = protocol.parse(msg.data)
                if m.kind == protocol.KIND_PING:
                    self.log.pings += 1
                    await ws.send_bytes(protocol.encode_ping())
                    continue
                if m.kind != protocol.KIND_AUDIO:
                    continue
                pcm = decoder.decode(m.data)
                self.log.samples_in += len(pcm)
                if len(pcm):
                    self.log.peak_in = max(self.log.peak_in, float(np.abs(pcm).max()))
                pending = np.concatenate([pending, pcm])
                while len(pending) >= FRAME:
                    held.append(pending[:FRAME])
                    pending = pending[FRAME:]
                    if len(held) <= self.lag_frames:
                        continue
                    frame = held.pop(0)
                    # Echo, plus a quiet tone so that even a silent microphone gets audible audio back.
                    t = (self.log.frames_out * FRAME + np.arange(FRAME)) / 24000
                    out = 0.8 * frame + 0.1 * np.sin(2 * np.pi * 440 * t).astype(np.float32)
                    ogg = encoder.encode(out)
                    if ogg:
                        await send(protocol.encode_audio(ogg))
                    self.log.frames_out += 1
                    if self.log.frames_out % self.text_every == 0:
                        await send(protocol.encode_text(f" word{self.log.frames_out // self.text_every}"))
        finally:
            sender.cancel()
        return ws


class AppServer:
    """Runs an aiohttp app, or a MoshiServer (its ASGI app on uvicorn), on a free localhost port in a
    background thread (`with AppServer(app)`)."""

    def __init__(self, app):
        self.app = app
        self.port = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def __enter__(self):
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(30)
        return self

    async def _start(self) -> None:
        if not isinstance(self.app, web.Application):  # a MoshiServer
            from openmoshi.serving.app import Runner
            from server_utils import listening_socket

            self._runner, sock = Runner(self.app), listening_socket()
            await self._runner.start(sock)
            self.port = sock.getsockname()[1]
            self._stop = self._runner.stop
            return
        self._runner = web.AppRunner(self.app, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        self._stop = self._runner.cleanup

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


class StubServer(AppServer):
    """A ChatStub served in a background thread; `.stub.log` says what it saw."""

    def __init__(self, stub: ChatStub | None = None):
        self.stub = stub or ChatStub()
        super().__init__(self.stub.app())
