"""The one start-up of every command that streams: a model loaded and made fast for its device.

    model, speed = start(files, device, dtype, quantize, SpeedConfig(cuda_graphs=False))
    engine = Engine.build(model, batch, speed)            # offline inference, bench
    server = MoshiServer.for_model(model, speed, config)  # serve, each Ray replica
"""

from __future__ import annotations

from dataclasses import replace

from openmoshi.engine.speed import Speed, SpeedConfig, prepare
from openmoshi.loading.model import LoadedModel, load_model
from openmoshi.loading.resolve import ModelFiles


def start(files: ModelFiles, device=None, dtype=None, quantize: str | None = None,
          speed: SpeedConfig = SpeedConfig()) -> tuple[LoadedModel, Speed]:
    """Loads the model of `files` and applies the speed paths of its device (`speed.prepare`)."""
    return make_fast(load_model(files, device, dtype, quantize), speed)


def make_fast(model: LoadedModel, speed: SpeedConfig = SpeedConfig()) -> tuple[LoadedModel, Speed]:
    lm, mimi, chosen = prepare(model.lm, model.mimi, model.device, speed)
    return replace(model, lm=lm, mimi=mimi), chosen
