"""A model's server from its files, whatever the model: `openmoshi serve` and each Ray replica build
theirs here, so one process (or replica) hosts the same models either way.

    server = build_server(files, device, dtype, quantize, config)        # Moshi, Hibiki, PersonaPlex, STT
    server = build_server(files, device, dtype, None, config, TTSOptions(voice="NAME"))   # a TTS model

The model is loaded in a passing thread (`engine.threads`): the model loop's worker is then torch's
one CPU thread. A Kyutai TTS checkpoint (config.json with `tts_config`) gets a `tts_loop` server
with its voices (`serving.tts.TTSHost`); the others `MoshiServer.for_model` (STT by its model type).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

DEFAULT_TTS_VOICE = "expresso/ex03-ex01_happy_001_channel1_334s.wav"
DEFAULT_TTS_VOICE_REPO = "kyutai/tts-voices"


@dataclass(frozen=True)
class TTSOptions:
    """How a TTS model is served (plain data: Ray ships it to replicas)."""

    voice: str | None = DEFAULT_TTS_VOICE  # a stream's voice when it names none
    voice_repo: str = DEFAULT_TTS_VOICE_REPO  # where named voices are looked up (repo id or folder)
    cfg_coef: float = 2.0  # a stream's default cfg_alpha (CFG-distilled models), moshi-server's
    n_q: int = 32  # audio codebooks generated, at most the model's


def is_tts(config) -> bool:
    return bool(config.tts_config)


def build_server(files, device, dtype, quantize, config, tts: TTSOptions | None = None, cuda_graphs=None):
    """The `server.MoshiServer` of a model's files (`loading.resolve.ModelFiles`)."""
    from openmoshi.engine.speed import SpeedConfig
    from openmoshi.engine.startup import start
    from openmoshi.engine.threads import passing
    from openmoshi.serving.server import MoshiServer

    if is_tts(files.config):
        from openmoshi.inference.tts import load_tts
        from openmoshi.lm.tts import TTSSettings
        from openmoshi.serving.tts import TTSHost

        tts = tts or TTSOptions()
        model = passing(load_tts, files, device, dtype, voice_repo=tts.voice_repo, quantize=quantize)
        host = passing(TTSHost.build, model, TTSSettings(n_q=tts.n_q, cfg_coef=tts.cfg_coef), tts.voice)
        m = model.model
        return MoshiServer(m.lm, m.mimi, m.tokenizer, replace(config, cfg_coef=1.0, voice_dir=None), tts=host)
    model, speed = passing(start, files, device, dtype, quantize, SpeedConfig(cuda_graphs=cuda_graphs))
    return MoshiServer.for_model(model, speed, config)
