"""Small random checkpoints in the official layout, for inference tests and benchmarks.

`make_checkpoint(folder, kind)` writes config.json, the LM safetensors (official LMModel with random
weights), a random official Mimi with random codebooks (cached across runs), and a SentencePiece
model trained on the fly with `text_card` pieces. `official_loop` is the official
`moshi.run_inference.InferenceState` loop on the same files, the parity oracle.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import torch

from lm_utils import TINY_7B, TINY_STT, make_official_lm

TEXT_CARD = 100
NAMES = dict(moshi_name="lm.safetensors", mimi_name="mimi.safetensors", tokenizer_name="tok.model")

MOSHI = dict(TINY_7B, card=2048, text_card=TEXT_CARD)
# "small": a wider and deeper model, for the benchmark.
SMALL = dict(MOSHI, dim=256, num_heads=8, num_layers=6, depformer_dim=128, depformer_dim_feedforward=528,
             depformer_num_heads=4, depformer_num_layers=2, context=200)
STT = dict(TINY_STT, card=2048, text_card=TEXT_CARD, n_q=8, delays=[0] * 9)
STT_CONFIG = {"audio_silence_prefix_seconds": 0.4, "audio_delay_seconds": 0.5}
# A small official Mimi with the released rates (24 kHz, 1920-sample frames, codebooks of 2048 codes),
# for tests that run whole conversations on 2 CPU cores, where the released Mimi costs ~0.5 s a frame.
# Its transformer context (250 encoder steps, 10 s) outlasts every test's audio.
SMALL_MIMI = {
    "sample_rate": 24000, "channels": 1, "frame_rate": 12.5,
    "seanet": {"channels": 1, "dimension": 32, "n_filters": 4, "n_residual_layers": 1,
               "ratios": [8, 6, 5, 4], "kernel_size": 7, "residual_kernel_size": 3,
               "last_kernel_size": 3, "dilation_base": 2, "compress": 2, "causal": True,
               "activation": "ELU", "norm": "none", "pad_mode": "constant", "true_skip": True,
               "disable_norm_outer_blocks": 0},
    "quantizer": {"dimension": 16, "n_q": 16, "bins": 2048, "input_dimension": 32, "output_dimension": 32},
    "transformer": {"d_model": 32, "num_heads": 2, "num_layers": 1, "causal": True,
                    "layer_scale": 0.01, "context": 250, "conv_layout": True, "max_period": 10000,
                    "gating": "none", "norm": "layer_norm", "positional_embedding": "rope",
                    "dim_feedforward": 64, "input_dimension": 32, "output_dimensions": [32]},
}


def _mimi(seed: int, small: bool = False) -> Path:
    """A random official Mimi checkpoint (the released layout, or SMALL_MIMI), cached in the temp
    folder (it takes seconds to make)."""
    from safetensors.torch import save_file

    from official_utils import save_official_mimi

    cache = Path(tempfile.gettempdir()) / "openmoshi_test_ckpt"
    cache.mkdir(exist_ok=True)
    path = cache / f"mimi_{'small_' if small else ''}seed{seed}.safetensors"
    if not path.exists():
        tmp = cache / f"mimi_{os.getpid()}.tmp"
        if small:
            mimi = _small_official_mimi(seed)
            save_file({k: v.contiguous() for k, v in mimi.state_dict().items()}, str(tmp))
        else:
            save_official_mimi(tmp, seed)
        os.replace(tmp, path)
    return path


def _small_official_mimi(seed: int):
    """SMALL_MIMI, official, with random weights and codebooks, and no SEANet biases. With random
    biases, its latents sit on a large constant offset, so the quantizer's distances (a difference
    of large squares) tie within float rounding and a batch of two encodes otherwise than one; and
    its decoder plays one fixed waveform whatever the codes. Without them, the codebooks are fitted
    again, and the decoder's last conv is scaled to speech level (std 0.1)."""
    from official_utils import _random_codebooks, make_official_mimi, speech

    mimi = make_official_mimi(seed, SMALL_MIMI["quantizer"]["n_q"], SMALL_MIMI)
    with torch.no_grad():
        for name, p in [*mimi.encoder.named_parameters(), *mimi.decoder.named_parameters()]:
            if name.endswith("bias"):
                p.zero_()
        _random_codebooks(mimi, torch.Generator().manual_seed(seed + 2))
        pcm = mimi.decode(mimi.encode(speech(1.0)[None, None]))
        mimi.decoder.model[-1].conv.conv.weight.mul_(0.1 / pcm.std())
    return mimi


def _tokenizer(path: Path, vocab: int) -> None:
    import sentencepiece as spm
    from official_utils import SPEECH_TEXT

    words = (SPEECH_TEXT + " one two three four five six seven eight nine ten hello world moshi speaks "
             "listens answers questions about weather music science history").split()
    lines = [" ".join(words[i:i + 12]) for i in range(0, len(words), 6)] * 4
    corpus = path.with_suffix(".txt")
    corpus.write_text("\n".join(lines) + "\n")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(path.with_suffix("")), vocab_size=vocab,
        unk_id=0, bos_id=1, eos_id=2, pad_id=3, character_coverage=1.0, minloglevel=2,
        num_threads=1)
    corpus.unlink()


def make_checkpoint(folder: Path, kind: str = "moshi", seed: int = 0, lm_kwargs: dict | None = None,
                    config: bool = True, small_mimi: bool = False) -> dict:
    """Writes a checkpoint folder; returns the raw config dict. `small_mimi`: SMALL_MIMI, its
    config beside it as `mimi.json` (config.json's `mimi_config_name`, which the official loader reads)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    kwargs = dict(lm_kwargs or (STT if kind == "stt" else MOSHI))
    lm = make_official_lm(kwargs, seed)
    if kind == "hibiki":
        _hibiki_eos_bias(lm)
    names = NAMES if config else dict(moshi_name="model.safetensors",
                                      mimi_name="tokenizer-e351c8d8-checkpoint125.safetensors",
                                      tokenizer_name="tokenizer_spm_32k_3.model")
    save_file({k: v.contiguous() for k, v in lm.state_dict().items()}, str(folder / names["moshi_name"]))
    os.link(_mimi(seed, small_mimi), folder / names["mimi_name"]) if not (folder / names["mimi_name"]).exists() else None
    _tokenizer(folder / names["tokenizer_name"], kwargs["text_card"])
    raw = dict(kwargs, model_type=kind, **NAMES)
    if small_mimi:
        (folder / "mimi.json").write_text(json.dumps(SMALL_MIMI))
        raw["mimi_config_name"] = "mimi.json"
    if kind == "stt":
        raw["stt_config"] = STT_CONFIG
    if config:
        (folder / "config.json").write_text(json.dumps(raw))
    return raw


def _hibiki_eos_bias(lm) -> None:
    """Makes the end-of-input code (card on the user's semantic stream) push the text towards EOS
    (id 2), so that a random Hibiki stops soon after its input ends."""
    with torch.no_grad():
        alpha = lm.out_norm.alpha.flatten() if hasattr(lm.out_norm, "alpha") else torch.ones(lm.dim)
        w = lm.text_linear.weight[2]
        direction = w * alpha.sign() / alpha.abs().clamp(min=0.05)
        lm.emb[lm.dep_q].weight[lm.card] = 40.0 * direction / direction.norm() * lm.dim ** 0.5


def official_loop(folder: Path, wav: torch.Tensor, batch: int = 1, seed: int = 4242, timer: list | None = None,
                  cfg_coef: float = 1.0, **gen) -> tuple:
    """The official offline loop (`moshi.run_inference.InferenceState`) on a checkpoint folder:
    ([(text tokens [T], pcm [1, N])] per batch item, the text it printed for item 0)."""
    from moshi.models import loaders
    from moshi.run_inference import InferenceState, seed_all

    info = loaders.CheckpointInfo.from_hf_repo("unused/unused", folder / NAMES["moshi_name"],
                                               folder / NAMES["mimi_name"], folder / NAMES["tokenizer_name"],
                                               folder / "config.json")
    mimi = info.get_mimi(device="cpu")
    lm = info.get_moshi(device="cpu", dtype=torch.float32)
    tok = info.get_text_tokenizer()
    seed_all(seed)
    state = InferenceState(info, mimi, tok, lm, batch, cfg_coef, "cpu", **(info.lm_gen_config | gen))
    state.printer = _Collector()
    start = time.perf_counter()
    with torch.no_grad():
        out = state.run(wav.reshape(1, 1, -1).expand(batch, -1, -1))
    if timer is not None:  # seconds of the loop alone, for benchmarks
        timer.append(time.perf_counter() - start)
    return out, "".join(state.printer.pieces)


class _Collector:
    """Stands in for the official printer: keeps the printed text."""

    def __init__(self):
        self.pieces = []

    def print_token(self, text, *args, **kwargs):
        self.pieces.append(text)

    def log(self, *args, **kwargs):
        pass

    def print_header(self, *args, **kwargs):
        pass
