"""`openmoshi serve` as a subprocess on a checkpoint folder (random LM, random full-size Mimi):
it loads, answers a conversation over the official protocol, and shuts down gracefully on SIGINT."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys

import aiohttp
import pytest

from chat_client import chat
from infer_utils import make_checkpoint


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_serve_subprocess(tmp_path):
    make_checkpoint(tmp_path / "repo")
    port = _free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "openmoshi", "serve", "--hf-repo", str(tmp_path / "repo"), "--host", "127.0.0.1",
         "--port", str(port), "--max-sessions", "2", "--queue", "3", "--threads", "1", "--auth-token", "tok", "--device", "cpu"],
        stderr=subprocess.PIPE, text=True, env=env)
    try:
        async def main():
            async with aiohttp.ClientSession() as s:
                for _ in range(600):
                    try:
                        r = await s.get(f"http://127.0.0.1:{port}/health")
                        if r.status == 200:
                            health = await r.json()
                            break
                    except aiohttp.ClientError:
                        pass
                    if proc.poll() is not None:
                        raise AssertionError("server exited: " + proc.stderr.read())
                    await asyncio.sleep(0.1)
            url = f"ws://127.0.0.1:{port}/api/chat"
            refused = await chat(url, 0.2)
            # The full-size Mimi is slower than real time on a small CPU: ask for few frames back.
            res = await chat(url + "?worker_auth_id=tok&text_temperature=0.7&audio_topk=100", 1.0, drain=20)
            return refused, res, health
        refused, res, health = asyncio.run(main())
        assert health["queue_size"] == 3 and health["waiting"] == 0
        assert not refused.handshake and "unauthorized" in refused.errors[0]
        assert res.handshake and not res.errors and res.frames_received >= 3
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    events = [json.loads(line)["event"] for line in err.splitlines() if line.startswith("{")]
    assert proc.returncode == 0, err[-2000:]
    for name in ("listening", "conversation_start", "conversation_end", "draining", "server_stopped"):
        assert name in events, (name, events)
