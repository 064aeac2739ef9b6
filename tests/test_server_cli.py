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
         "--port", str(port), "--max-sessions", "2", "--queue", "3", "--threads", "1", "--auth-token", "tok", "--device", "cpu",
         "--clock", "input"],
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
            # The full-size Mimi may be slower than real time on a small CPU: the input clock answers
            # every frame all the same, however late.
            res = await chat(url + "?worker_auth_id=tok&text_temperature=0.7&audio_topk=100", 1.0, drain=60,
                             unanswered=1)
            return refused, res, health
        refused, res, health = asyncio.run(main())
        assert health["queue_size"] == 3 and health["waiting"] == 0
        assert not refused.handshake and "unauthorized" in refused.errors[0]
        assert res.handshake and not res.errors and res.frames_received == res.frames_sent - 1
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


def test_port_in_use_is_one_error_before_anything_loads(tmp_path):
    """No success line, no model loaded: the port is bound first."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "openmoshi", "serve", "--hf-repo", str(tmp_path / "none"),
                               "--host", "127.0.0.1", "--port", str(port)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith(f"openmoshi: error: cannot listen on 127.0.0.1:{port}") and "--port" in lines[-1]
    assert not any(word in proc.stderr for word in ("listening", "server_started", "loading_model", "Traceback"))


def test_logs_read_as_text_on_a_terminal_and_json_otherwise(monkeypatch, capsys):
    import logging

    from openmoshi.cli.serve import _source, setup_logging
    from openmoshi.serving.server import event

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    setup_logging("auto")
    event("listening", url="http://localhost:8998/", websocket="/api/chat")
    event("conversation_start", peer="1.2.3.4", slot=0)
    text = capsys.readouterr().err.splitlines()
    assert text[0].endswith("ready: open http://localhost:8998/ in a browser (websocket /api/chat)")
    assert "conversation start" in text[1] and "peer=1.2.3.4" in text[1] and not text[1].startswith("{")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    setup_logging("auto")
    event("listening", url="http://localhost:8998/", websocket="/api/chat")
    line = json.loads(capsys.readouterr().err.splitlines()[0])
    assert line["event"] == "listening" and line["url"] == "http://localhost:8998/"
    logging.getLogger().handlers.clear()

    # Each message once, in the chosen format: huggingface_hub's own handler and Python's warnings
    # would print theirs a second time, plain.
    from huggingface_hub.utils import logging as hf_logging

    logging.captureWarnings(False)  # an earlier in-process `serve` left it on under another test's warning hook
    setup_logging("json")
    hf_logging.get_logger("huggingface_hub.file_download").warning("a hub warning")
    import warnings
    with warnings.catch_warnings():  # whatever filters earlier tests left, this one is shown
        warnings.simplefilter("always")
        warnings.warn("a python warning", UserWarning)
    err = capsys.readouterr().err.splitlines()
    hub = [line for line in err if "a hub warning" in line]
    py = [line for line in err if "a python warning" in line]
    assert len(hub) == 1 and len(py) == 1, err
    assert hub[0].startswith("{") and py[0].startswith("{")  # both in our JSON format
    logging.getLogger().handlers.clear()
    logging.captureWarnings(False)

    class Args:
        hf_repo, moshi_weight, mimi_weight, tokenizer = "kyutai/moshiko-pytorch-bf16", None, None, None
    assert _source(Args) == "hub repo kyutai/moshiko-pytorch-bf16"
    Args.moshi_weight, Args.mimi_weight, Args.tokenizer = "a", "b", "c"
    assert _source(Args) == "local files"
    Args.mimi_weight = Args.tokenizer = None
    Args.hf_repo = str(os.path.dirname(__file__))
    assert _source(Args) == f"folder {Args.hf_repo} (and --moshi-weight)"
