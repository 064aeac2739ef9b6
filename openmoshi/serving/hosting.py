"""One process, several models: each model is its own `MoshiServer` (model loop, slots, waiting line,
metrics), and one app routes each endpoint to the server whose model speaks it.

    servers = ModelServers([moshi_server, stt_server])   # at most one server per kind of model
    app = asgi_app(servers)          # /api/chat, /v1/realtime -> moshi; /api/asr-streaming -> stt
    servers.health()                 # 200 while every model can serve; each model's body under "models"

A kind (`MoshiServer.model_kind`): "speech" (Moshi, Hibiki, PersonaPlex: /api/chat and
/v1/realtime), "stt" (Kyutai STT: /api/asr-streaming), "tts" (Kyutai TTS: /api/tts_streaming, websocket
and POST). An endpoint whose kind no server has goes to
the first server, which refuses it with a message naming the endpoints it serves. Nothing is shared
between the models' servers but the web server: a model's failures, slots and waiting line never
touch another's (as Unmute deploys STT, TTS and its LLM side by side).
"""

from __future__ import annotations

import asyncio
import re


class ModelServers:
    def __init__(self, servers: list):
        if not servers:
            raise ValueError("no server to host")
        kinds = [s.model_kind for s in servers]
        if len(set(kinds)) != len(kinds):
            raise ValueError(f"one model per kind: got {kinds}")
        self.servers = list(servers)
        self.config = servers[0].config  # the web side's settings (static folder, heartbeat): the first's
        self.failed: asyncio.Event | None = None

    def for_kind(self, kind: str):
        """The server of that kind of model, else the first (which refuses the endpoint)."""
        return next((s for s in self.servers if s.model_kind == kind), self.servers[0])

    @property
    def personas(self):
        return self.for_kind("speech").personas

    @property
    def sessions(self) -> set:
        return set().union(*(s.sessions for s in self.servers))

    def problem(self) -> str | None:
        """Why one of the models cannot serve (see `MoshiServer.problem`), None when all can."""
        return next((f"{s.model_kind}: {p}" for s in self.servers if (p := s.problem()) is not None), None)

    @property
    def last_error(self) -> str | None:
        return next((s.loop.last_error for s in self.servers if s.failed.is_set()), None)

    async def start(self) -> None:
        """Starts every model loop; `failed` is set once any of them is given up."""
        self.failed = asyncio.Event()
        for s in self.servers:
            await s.start()

        async def watch(server) -> None:
            await server.failed.wait()
            self.failed.set()

        self._watchers = [asyncio.create_task(watch(s)) for s in self.servers]

    async def drain(self) -> None:
        await asyncio.gather(*(s.drain() for s in self.servers))

    async def stop(self) -> None:
        for task in getattr(self, "_watchers", []):
            task.cancel()
        for s in self.servers:
            await s.stop()

    def health(self) -> tuple[int, dict]:
        if len(self.servers) == 1:
            return self.servers[0].health()
        answers = {s.model_kind: s.health() for s in self.servers}
        bad = [body["status"] for status, body in answers.values() if status != 200]
        return (503 if bad else 200), {"status": bad[0] if bad else "ok",
                                       "models": {kind: body for kind, (_, body) in answers.items()}}

    def metrics(self) -> str:
        """Prometheus text: one model's as it renders; several, merged by family with a `model` label."""
        if len(self.servers) == 1:
            return self.servers[0].metrics.render()
        return merge_metrics([(s.model_kind, s.metrics.render()) for s in self.servers])


_SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(\{[^}]*\})?\s+(.*)$")


def merge_metrics(parts: list[tuple[str, str]]) -> str:
    """Several registries' Prometheus text as one: each family's HELP/TYPE lines once, then every
    registry's samples of it with `model="<kind>"` added to their labels."""
    families: dict[str, list[str]] = {}
    headers: dict[str, list[str]] = {}
    for model, text in parts:
        family = None
        for line in text.splitlines():
            if line.startswith("# "):
                words = line.split()
                if len(words) >= 3 and words[1] in ("HELP", "TYPE"):
                    family = words[2]
                    known = headers.setdefault(family, [])
                    if line not in known:
                        known.append(line)
                    families.setdefault(family, [])
                continue
            m = _SAMPLE.match(line)
            if not m:
                continue
            name, labels, value = m.groups()
            inner = labels[1:-1] if labels else ""
            labelled = f'{name}{{model="{model}"{"," + inner if inner else ""}}} {value}'
            families.setdefault(family or name, []).append(labelled)
    lines = []
    for family, samples in families.items():
        lines += headers.get(family, []) + samples
    return "\n".join(lines) + "\n"
