"""The server on a real local Ray cluster (a head and one more node, on loopback), as
`openmoshi serve --replicas` deploys it: conversations spread over the replicas, each replica's line
holds its own and the one beyond is told "busy", a replica that dies takes only its own
conversations while the other goes on, Ray replaces it, and shutdown gives conversations their grace
period and then the reconnect message. Bounded for 2 cores: tiny models, a minute or so. The command
itself, with HAProxy: test_cluster_cli.py."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import aiohttp
import numpy as np
import pytest
import sphn

from server_utils import tiny_checkpoint

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

FRAME = 1920
LONG = 600.0  # seconds of audio of a conversation that the server, not the client, must end


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    import ray._private.services as services
    from ray.cluster_utils import Cluster

    with pytest.MonkeyPatch.context() as mp:  # undone when the module's tests are over
        # Keep every connection on loopback: Ray would turn 127.0.0.1 into the machine's address.
        mp.setattr(services, "resolve_ip_for_localhost", lambda host: host)
        # Read by the node processes started below. Routers ask replicas how busy they are for each
        # new connection rather than trusting a 10 s old answer, and wait for slow answers on 2 busy
        # cores; and they choose the least busy replica of all, not first the one on their own node
        # (both "nodes" are this machine: which proxy takes a connection would decide where it goes).
        mp.setenv("RAY_SERVE_QUEUE_LENGTH_CACHE_TIMEOUT_S", "0")
        mp.setenv("RAY_SERVE_QUEUE_LENGTH_RESPONSE_DEADLINE_S", "8")  # a replica busy with its model loop on
        # these 2 cores may answer late: a missed deadline would have the router choose blind
        mp.setenv("RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING", "0")
        node = {"num_cpus": 2, "object_store_memory": 80 * 1024 ** 2, "node_ip_address": "127.0.0.1"}
        c = Cluster(initialize_head=True, head_node_args=node)
        c.add_node(**node)
        ray.init(address=c.address, _node_ip_address="127.0.0.1", logging_level="ERROR", log_to_driver=False)
        try:
            yield tmp_path_factory.mktemp("cluster")
        finally:
            serve.shutdown()
            ray.shutdown()
            c.shutdown()


class Client:
    """A conversation that streams audio in real time and records what comes back, and how it ends."""

    def __init__(self, url: str, seconds: float):
        self.url, self.frames = url, int(seconds / 0.08)
        self.handshake = asyncio.Event()
        self.queued = asyncio.Event()
        self.places: list[dict] = []  # place-in-line messages
        self.arrivals: list[float] = []
        self.texts: list[str] = []
        self.errors: list[str] = []
        self.close_code = None
        self.refused = None  # HTTP status of a refused websocket
        self.end = None

    async def run(self) -> "Client":
        writer, reader = sphn.OpusStreamWriter(24000), sphn.OpusStreamReader(24000)
        rng = np.random.default_rng(len(self.url))
        async with aiohttp.ClientSession() as session:
            try:
                ws = await session.ws_connect(self.url)
            except aiohttp.WSServerHandshakeError as e:
                self.refused = e.status
                return self
            async with ws:
                async def receive():
                    async for msg in ws:
                        if msg.type != aiohttp.WSMsgType.BINARY:
                            self.end = (msg.type, msg.data, msg.extra)
                            break
                        kind, payload = msg.data[0], msg.data[1:]
                        if kind == 0:
                            self.handshake.set()
                        elif kind == 4:  # waiting in a replica's line
                            self.places.append(json.loads(payload))
                            self.queued.set()
                        elif kind == 1:
                            reader.append_bytes(payload)
                            self.arrivals.append(time.monotonic())
                        elif kind == 2:
                            self.texts.append(payload.decode())
                        elif kind == 5:
                            self.errors.append(payload.decode())
                    self.close_code = ws.close_code

                receiver = asyncio.create_task(receive())
                await asyncio.wait({receiver, asyncio.create_task(self.handshake.wait())},
                                   return_when=asyncio.FIRST_COMPLETED)
                start = time.monotonic()
                for i in range(self.frames):
                    await asyncio.sleep(max(0.0, start + i * 0.08 - time.monotonic()))
                    if receiver.done():
                        break
                    page = writer.append_pcm((0.1 * rng.standard_normal(FRAME)).astype(np.float32))
                    if page:
                        try:
                            await ws.send_bytes(b"\x01" + page)
                        except (ConnectionError, RuntimeError):
                            break
                await asyncio.wait({receiver}, timeout=10)
        return self

    async def started(self, timeout: float = 30.0) -> None:
        """Until the conversation got its slot or a place in a line (whichever comes first)."""
        waits = {asyncio.create_task(self.handshake.wait()), asyncio.create_task(self.queued.wait())}
        done, pending = await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        assert done, f"neither a slot nor a place in line within {timeout} s"


async def until(predicate, timeout: float, what: str) -> None:
    """Polls `predicate` until it holds; fails after `timeout` s saying `what` was awaited."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        await asyncio.sleep(0.05)


@pytest.mark.slow
def test_replicas_spread_refuse_fail_alone_come_back_and_drain(cluster):
    from openmoshi.serving import cluster as ray_cluster
    from openmoshi.serving.server import SHUTDOWN_MESSAGE

    folder = tiny_checkpoint(cluster / "model")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spec = ray_cluster.ReplicaSpec(files={"hf_repo": str(folder)}, device="cpu", threads=1,
                                   server={"max_sessions": 1, "queue_size": 1, "static_dir": None,
                                           "shutdown_grace": 0.5})
    # Two CPUs per replica: one replica per node. It returns once both answer through the proxy.
    routable = ray_cluster.run(spec, replicas=2, host="127.0.0.1", port=port, blocking=False,
                               graceful_shutdown_s=2.0, cpus_per_replica=2)
    assert routable == 2
    url = f"ws://127.0.0.1:{port}/api/chat"

    async def scenario():
        # Ready means routable: a takes one replica's slot, b the other's, at the first try. They
        # (and `again` below) talk until the server ends them, however long a loaded machine takes.
        a = Client(url, LONG)
        tasks = [asyncio.create_task(a.run())]
        await asyncio.wait_for(a.handshake.wait(), 30)
        # Ray's router picks the replica whose queue-length probe says it is least busy; on two
        # loaded cores a probe can miss its deadline and the router then picks at random. Such a b
        # lands in a's line: it leaves and tries again (a few times at most).
        for _ in range(4):
            b = Client(url, LONG)
            b_task = asyncio.create_task(b.run())
            await b.started()
            if b.handshake.is_set() and not b.places:
                break
            b_task.cancel()
            await asyncio.wait({b_task})
            await asyncio.sleep(1.0)
        assert b.handshake.is_set() and not b.places, "the proxy kept sending b to a's line: it did not know both replicas"
        tasks.append(b_task)
        # Each replica's line holds one client (the router picks the least busy replica, so the
        # first extra waits in one line and the second in the other), and the third is told
        # "busy" by the replica it meets, which closes with 1013.
        extra = [Client(url, 1) for _ in range(3)]
        extra_tasks = []
        for client in extra[:2]:
            extra_tasks.append(asyncio.create_task(client.run()))
            await client.started()
        extra_tasks.append(asyncio.create_task(extra[2].run()))
        await asyncio.wait_for(extra_tasks[2], 30)
        for client in extra[:2]:
            assert not client.handshake.is_set() and client.places[0] == {"queue_position": 1, "queue_length": 1}, \
                client.places
        busy = extra[2]
        assert not busy.handshake.is_set() and not busy.places and busy.close_code == 1013, (busy.close_code,
                                                                                             busy.errors)
        assert len(busy.errors) == 1 and "busy" in busy.errors[0], busy.errors
        for task in extra_tasks:
            task.cancel()

        # A replica dies (its process killed: it can say nothing): its conversation loses the
        # connection, the other goes on.
        await until(lambda: all(t.done() for t in extra_tasks), 10, "the extra clients to leave")
        replicas = await asyncio.to_thread(_replica_actors)
        assert len(replicas) == 2
        killed_at = time.monotonic()
        await asyncio.to_thread(ray.kill, replicas[0], no_restart=False)
        done, _ = await asyncio.wait(tasks, timeout=30, return_when=asyncio.FIRST_COMPLETED)
        assert len(done) == 1, "the conversation on the killed replica did not end, or both did"
        lost = next(iter(done)).result()
        alive = b if lost is a else a
        assert lost.errors == [] and lost.close_code not in (None, 1000), (lost.close_code, lost.errors, lost.end)
        # The other conversation goes on: frames keep coming (2 cores are shared with Ray restarting
        # the actor, so it is given time; a stop would never bring them).
        await until(lambda: sum(t > killed_at for t in alive.arrivals) >= 10, 30,
                    "10 frames for the conversation on the other replica")
        assert not tasks[[a, b].index(alive)].done() and not alive.errors

        # Ray replaces the replica: a new client is served again, audio and words.
        again = None
        for _ in range(60):
            again = Client(url, LONG)
            again_task = asyncio.create_task(again.run())
            try:
                await asyncio.wait_for(again.handshake.wait(), 2.0)
                break
            except asyncio.TimeoutError:
                again_task.cancel()
                again = None
        assert again is not None, "the replica was not replaced"
        await until(lambda: len(again.arrivals) >= 5 and again.texts, 30, "audio and text for the new client")

        # Shutdown: Ray sends nothing more to the leaving replicas and kills them after
        # graceful_shutdown_s (2 s here); before that, each replica sees it is being stopped,
        # gives its conversations their grace (0.5 s here) and tells the ones left to reconnect.
        deleted_at = time.monotonic()
        await asyncio.to_thread(serve.delete, ray_cluster.APP_NAME)
        await asyncio.wait_for(asyncio.gather(again_task, *tasks, return_exceptions=True), 60)
        return again, alive, deleted_at

    again, alive, deleted_at = asyncio.run(scenario())
    for c in (again, alive):
        assert c.errors == [SHUTDOWN_MESSAGE], (c.close_code, c.errors, c.end)
        assert c.arrivals[-1] > deleted_at  # served until the delete, then told


def test_a_replica_hosts_stt_and_tts(cluster):
    """`serve --replicas 1 --hf-repo STT --tts-model TTS`'s spec: each replica hosts both models,
    each its own server; through Ray's proxy /health covers both, the STT stream gets Ready and a
    POST to /api/tts_streaming returns speech."""
    import urllib.request

    import msgpack

    from stt_utils import make_stt
    from tts_utils import make_tts_checkpoint, make_voice

    from openmoshi.serving import cluster as ray_cluster

    stt = make_stt(cluster / "stt", seed=5)
    tts = cluster / "tts"
    make_tts_checkpoint(tts, "emb", seed=2)
    make_voice(tts / "voices", "alice", 3)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spec = ray_cluster.ReplicaSpec(files={"hf_repo": str(stt)}, device="cpu", threads=1,
                                   server={"max_sessions": 1, "queue_size": 1, "static_dir": None},
                                   tts={"voice": "alice", "voice_repo": str(tts / "voices")},
                                   extra=({"files": {"hf_repo": str(tts)}, "max_sessions": 2},))
    assert spec.max_connections == 1 + 2 + 2 * 1 + ray_cluster.REFUSE_ROOM
    serve.shutdown()  # a Serve instance left by an earlier test keeps its port: this test's would be ignored
    try:
        assert ray_cluster.run(spec, replicas=1, host="127.0.0.1", port=port, blocking=False,
                               graceful_shutdown_s=2.0, cpus_per_replica=2) == 1
        health = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=30).read())
        assert set(health["models"]) == {"stt", "tts"} and health["status"] == "ok"
        request = urllib.request.Request(f"http://127.0.0.1:{port}/api/tts_streaming",
                                         json.dumps({"text": "Hello there, my friend."}).encode())
        wav = urllib.request.urlopen(request, timeout=60).read()
        assert wav[:4] == b"RIFF" and len(wav) > 44 + 2 * 1920 * 10

        async def asr():
            import websockets

            async with websockets.connect(f"ws://127.0.0.1:{port}/api/asr-streaming") as ws:
                return msgpack.unpackb(await asyncio.wait_for(ws.recv(), 30))

        assert asyncio.run(asr()) == {"type": "Ready"}
    finally:
        serve.delete(ray_cluster.APP_NAME)


def _replica_actors():
    from ray.util.state import list_actors

    actors = list_actors(filters=[("state", "=", "ALIVE")])
    names = [a.name for a in actors if a.class_name.startswith("ServeReplica:openmoshi:")]
    return [ray.get_actor(name, namespace="serve") for name in names]


def test_the_deploy_file_builds_the_app_it_describes():
    """deploy/ray-serve.yaml, read as `serve run` reads it: its builder makes the deployment with
    one GPU per replica and room for each replica's sessions, line and refusals."""
    import importlib
    from pathlib import Path

    import yaml

    from openmoshi.serving.cluster import PROXY_QUEUE, REFUSE_ROOM

    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "deploy" / "ray-serve.yaml").read_text())
    app_cfg, = config["applications"]
    module, name = app_cfg["import_path"].split(":")
    builder = getattr(importlib.import_module(module), name)
    d = builder(app_cfg["args"])._bound_deployment
    server = app_cfg["args"]["server"]
    assert d.num_replicas == app_cfg["args"]["replicas"]
    assert d.max_ongoing_requests == server["max_sessions"] + server["queue_size"] + REFUSE_ROOM
    assert d.max_queued_requests == PROXY_QUEUE and d.ray_actor_options["num_gpus"] == 1
    for bad, match in (({"max_session": 3}, "unknown application args \\['max_session'\\]"),
                       ({"server": {"max_sesions": 3}}, "unknown server settings \\['max_sesions'\\]")):
        with pytest.raises(ValueError, match=match):
            builder({**app_cfg["args"], **bad})


def test_replica_health_is_held_until_the_cluster_is_routable(monkeypatch):
    """A replica's /health: 503 "starting" (with how many replicas are routable) until `run` has
    published the cluster ready, 200 from then on; a broken replica stays 503 whatever the cluster."""
    from types import SimpleNamespace

    from openmoshi.serving import readiness

    states = iter([None, {"ready": False, "routable": 1, "replicas": 2}, {"ready": True, "routable": 2, "replicas": 2}])
    monkeypatch.setattr(readiness, "read", lambda key: next(states))  # after that, reading it again would fail
    own = [(200, {"status": "ok"})] * 4 + [(503, {"status": "crashed"})]
    server = SimpleNamespace(health=lambda: (lambda s, b: (s, dict(b)))(*own.pop(0)))
    health = readiness.ReplicaHealth(server, "key")

    got = [asyncio.run(health()) for _ in range(5)]
    assert [(s, b["status"], b["replicas_routable"]) for s, b in got] == [
        (503, "starting", 0), (503, "starting", 1), (200, "ok", 2), (200, "ok", 2), (503, "crashed", 2)]
    assert {b["replica"] for _, b in got} == {readiness.replica_name()}
    plain = readiness.ReplicaHealth(SimpleNamespace(health=lambda: (200, {"status": "ok"})), None)
    assert asyncio.run(plain()) == (200, {"status": "ok", "replica": readiness.replica_name()})
    assert readiness.local_url("0.0.0.0", 80) == "http://127.0.0.1:80/health"
    assert readiness.local_url("::", 80, "/") == "http://[::1]:80/"
