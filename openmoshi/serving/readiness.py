"""When `openmoshi serve --replicas N` is ready: once all N replicas answer through the proxy.

Ray says an application is running once its replicas are; the proxy in front of them (Ray Serve's
HAProxy, or its Python proxy actor) learns of each replica a moment later (HAProxy's list of
backends held one replica for about 0.5 s), and conversations opened in between all go to the
replicas it knows, where some wait in line while another replica has free slots. So the command
that starts the cluster probes `/health` through the proxy until N different replicas have
answered, and says it is ready only then; until then every replica's `/health` answers 503
"starting" (with how many replicas are routable so far), so a client that waits for `/health`
waits for the whole cluster:

    openmoshi serve (driver)                          each replica
    publish(key, 0 of N)  ── Ray's key-value store ──> /health: 503 {"status": "starting", "replica": host:pid}
    serve.run; probe GET /health through the proxy ──> (answers with its name)
    N different names seen: publish(key, ready)  ───> /health: 200 {"status": "ok", "replica": ...}
    log the ready line

Replicas deployed without a key (`serve run deploy/ray-serve.yaml`: no command waits for them)
answer /health as the single-host server does, plus their name.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
import urllib.error
import urllib.request

KV_NAMESPACE = "openmoshi"
PROBE_PERIOD_S = 0.05
PROBE_TIMEOUT_S = 2.0


def replica_name() -> str:
    """Who answered a /health: one process of one machine."""
    return f"{socket.gethostname()}:{os.getpid()}"


def publish(key: str, routable: int, replicas: int, ready: bool) -> None:
    """The cluster's state as the replicas read it. Ray's own key-value store (in its control
    service) reaches every replica on every machine without another process of ours; the key stays
    when the command exits, since a cluster joined with --ray-address keeps serving after it."""
    from ray.experimental.internal_kv import _internal_kv_put

    value = json.dumps({"ready": ready, "routable": routable, "replicas": replicas})
    _internal_kv_put(key.encode(), value.encode(), overwrite=True, namespace=KV_NAMESPACE)


def read(key: str) -> dict | None:
    from ray.experimental.internal_kv import _internal_kv_get

    value = _internal_kv_get(key.encode(), namespace=KV_NAMESPACE)
    return json.loads(value) if value else None


class ReplicaHealth:
    """A replica's /health: the server's own answer plus the replica's name, held at 503
    "starting" while the command that started the cluster has not found it all routable."""

    def __init__(self, server, key: str | None):
        self.server, self.key = server, key
        self.name = replica_name()
        self.cluster: dict | None = None  # kept once ready: readiness is never taken back

    async def __call__(self) -> tuple[int, dict]:
        status, body = self.server.health()
        body["replica"] = self.name
        if self.key is None:
            return status, body
        cluster = self.cluster or await asyncio.to_thread(read, self.key) or {"ready": False, "routable": 0}
        if cluster["ready"]:
            self.cluster = cluster
        body["replicas_routable"] = cluster["routable"]
        body["replicas"] = cluster.get("replicas")
        if status == 200 and not cluster["ready"]:
            return 503, {**body, "status": "starting"}
        return status, body


def probe(url: str) -> str | None:
    """The name of the replica that answered one GET of `url` (/health) through the proxy, None when
    none did (the proxy does not route there yet, or answered itself)."""
    request = urllib.request.Request(url, headers={"Connection": "close"})  # each probe meets the proxy's choice anew
    try:
        with urllib.request.urlopen(request, timeout=PROBE_TIMEOUT_S) as r:
            data = r.read()
    except urllib.error.HTTPError as e:  # 503 "starting" comes from a replica too
        data = e.read()
    except (OSError, ValueError):
        return None
    try:
        body = json.loads(data)
    except ValueError:
        return None
    return body.get("replica") if isinstance(body, dict) else None


def wait_routable(url: str, replicas: int, key: str, timeout: float) -> int:
    """Probes `url` until `replicas` different replicas have answered or `timeout` s have passed;
    publishes each new count (the replicas' /health says it) and returns the last."""
    seen: set[str] = set()
    deadline = time.monotonic() + timeout
    while len(seen) < replicas and time.monotonic() < deadline:
        name = probe(url)
        if name is not None and name not in seen:
            seen.add(name)
            publish(key, len(seen), replicas, ready=False)
        time.sleep(PROBE_PERIOD_S)
    return len(seen)


def local_url(host: str, port: int, path: str = "/health") -> str:
    """`path` on this machine's proxy (a wildcard address is reached on loopback)."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}{path}"
