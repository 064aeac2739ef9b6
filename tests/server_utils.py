"""Tiny random models for server tests: a Mimi with the real 24 kHz / 1920-sample frame but few
channels, and the tiny 7B-shaped LM, fast enough for several conversations on a small CPU;
`serving`, the server on a free loopback port; and `recording_encoders`, what the server's Opus
encoders were given."""

from __future__ import annotations

import contextlib
import socket

import numpy as np
import torch

from openmoshi.lm.config import lm_config_from_dict
from openmoshi.lm.model import LMModel
from openmoshi.mimi.codec import Mimi
from openmoshi.mimi.config import mimi_config_from_dict
from openmoshi.serving import chat as chat_module
from openmoshi.serving.app import Runner
from openmoshi.serving.opus import OpusEncoder
from openmoshi.serving.server import MoshiServer, ServerConfig

from lm_utils import TINY_7B

TINY_MIMI_24K = {
    "sample_rate": 24000, "channels": 1, "frame_rate": 12.5,
    "seanet": {"channels": 1, "dimension": 16, "n_filters": 2, "n_residual_layers": 1,
               "ratios": [8, 6, 5, 4], "kernel_size": 7, "residual_kernel_size": 3,
               "last_kernel_size": 3, "dilation_base": 2, "compress": 2, "causal": True,
               "activation": "ELU", "norm": "none", "pad_mode": "constant", "true_skip": True},
    "quantizer": {"dimension": 8, "n_q": 8, "bins": TINY_7B["card"], "input_dimension": 16,
                  "output_dimension": 16},
    "transformer": {"d_model": 16, "num_heads": 2, "num_layers": 1, "causal": True,
                    "layer_scale": 0.01, "context": 10, "max_period": 10000, "gating": "none",
                    "norm": "layer_norm", "positional_embedding": "rope", "dim_feedforward": 32},
}


class FakeTokenizer:
    """`id_to_piece` like SentencePiece, with word-start markers on even ids."""

    def id_to_piece(self, token: int) -> str:
        return ("\u2581" if token % 2 == 0 else "") + f"w{token}"


def tiny_models(seed: int = 0, lm_kwargs: dict | None = None):
    """(lm, mimi, tokenizer) with random weights; Mimi codebooks are random so codes vary."""
    torch.manual_seed(seed)
    lm = LMModel(lm_config_from_dict(lm_kwargs or TINY_7B)).eval()
    with torch.no_grad():
        for p in lm.parameters():
            p.normal_(0, 0.2)
    mimi = Mimi(mimi_config_from_dict(TINY_MIMI_24K), num_codebooks=8).eval()
    with torch.no_grad():
        for name, b in list(mimi.named_parameters()) + list(mimi.named_buffers()):
            if b.dtype.is_floating_point and b.numel() and bool((b == b.flatten()[0]).all()):
                b.normal_(0, 0.3).abs_() if "usage" in name else b.normal_(0, 0.3)
    return lm, mimi, FakeTokenizer()


@contextlib.asynccontextmanager
async def serving(models, **config):
    """`async with serving(models, max_sessions=1) as (server, ws_url, http_url)`."""
    config.setdefault("static_dir", None)
    server = MoshiServer(*models, ServerConfig(**config))
    runner, sock = Runner(server), listening_socket()
    await runner.start(sock)
    port = sock.getsockname()[1]
    try:
        yield server, f"ws://127.0.0.1:{port}/api/chat", f"http://127.0.0.1:{port}"
    finally:
        await runner.stop()


def recording_encoders(monkeypatch) -> list:
    """Makes every conversation's Opus encoder keep what it was given (`pcm`, frames) and what it
    gave (`pages`); returns the list the encoders made from now on join. Opus is lossy: a test
    compares the sound a server sends before it, and the bytes a client got with these pages."""
    made = []

    class RecordingEncoder(OpusEncoder):
        def __init__(self):
            super().__init__()
            self.pcm, self.pages = [], []
            made.append(self)

        def encode(self, pcm):
            page = super().encode(pcm)
            self.pcm.append(np.array(pcm, np.float32))
            self.pages.append(page)
            return page

    monkeypatch.setattr(chat_module, "OpusEncoder", RecordingEncoder)
    return made


def listening_socket() -> socket.socket:
    """A socket bound to a free loopback port and listening, as `openmoshi serve` binds its own."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    sock.setblocking(False)
    return sock


def tiny_checkpoint(folder, seed: int = 0):
    """A model folder (config.json, LM, Mimi and its config, text tokenizer) of the tiny models
    above, loadable with --hf-repo FOLDER: what a replica on another process or machine reads."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    from infer_utils import _tokenizer
    from openmoshi.loading.files import released_keys

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lm, mimi, _ = tiny_models(seed)
    save_file(released_keys({k: v.contiguous() for k, v in lm.state_dict().items()}), str(folder / "lm.safetensors"))
    save_file({k: v.contiguous() for k, v in mimi.state_dict().items()}, str(folder / "mimi.safetensors"))
    (folder / "mimi.json").write_text(json.dumps(TINY_MIMI_24K))
    _tokenizer(folder / "tok.model", TINY_7B["text_card"])
    config = dict(TINY_7B, moshi_name="lm.safetensors", mimi_name="mimi.safetensors", tokenizer_name="tok.model",
                  mimi_config_name="mimi.json", model_type="moshi")
    (folder / "config.json").write_text(json.dumps(config))
    return folder
