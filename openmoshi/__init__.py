"""openmoshi: a plain PyTorch re-implementation of Kyutai's Moshi and its Mimi codec.

The package, by layer (each may import only the layers above it, as its __init__ says):

    errors                UserError, the root of what a user can fix
    audio, modules        audio files; the transformer and LoRA shared by both models
    mimi, lm              the codec; the language model and its generation loop
    accel                 speed paths applied at the call site (CUDA graphs, kernels, int8/int4)
    loading               checkpoints, adapters, tokenizer, and where a model's files come from
    inference, serving,   offline runs on files; the real-time server and client;
    bench                 the streaming-loop benchmark
    cli                   the `openmoshi` command

The names a library user needs are offered here, imported on first use so that `import openmoshi`
(and the command line, which imports it) stays light:

    import openmoshi
    cfg = openmoshi.load_model_config("config.json").lm            # or openmoshi.MOSHI_7B
    lm = openmoshi.load_lm("model.safetensors", cfg, device="cuda")
    mimi = openmoshi.load_mimi("tokenizer-e351c8d8-checkpoint125.safetensors", device="cuda")
    state = openmoshi.init_state(lm, batch_size=1)                  # then openmoshi.step(lm, state, codes)
    openmoshi.load_inference(hf_repo="kyutai/moshiko-pytorch-bf16").run("question.wav")
"""

__version__ = "0.1.0"

# Offered name -> "module:attribute" (imported by `__getattr__` on first use).
_OFFERED = {
    "UserError": "openmoshi.errors:UserError",
    "MOSHI_7B": "openmoshi.lm.config:MOSHI_7B",
    "LMConfig": "openmoshi.lm.config:LMConfig",
    "load_model_config": "openmoshi.lm.config:load_model_config",
    "SamplingConfig": "openmoshi.lm.sampling:SamplingConfig",
    "init_state": "openmoshi.lm.generate:init_state",
    "step": "openmoshi.lm.generate:step",
    "load_lm": "openmoshi.loading.lm:load_lm",
    "load_mimi": "openmoshi.loading.mimi:load_mimi",
    "load_text_tokenizer": "openmoshi.loading.tokenizer:load_text_tokenizer",
    "resolve_files": "openmoshi.loading.resolve:resolve_files",
    "load_model": "openmoshi.loading.model:load_model",
    "load_inference": "openmoshi.inference.offline:load",
}
__all__ = ["__version__", *_OFFERED]


def __getattr__(name: str):
    if name not in _OFFERED:
        raise AttributeError(f"module 'openmoshi' has no attribute {name!r}")
    import importlib

    module, _, attribute = _OFFERED[name].partition(":")
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + list(_OFFERED))
