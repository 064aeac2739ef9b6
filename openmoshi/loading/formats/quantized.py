"""LM checkpoints written by `openmoshi quantize`: the transformer layers' linears as
`accel.quantize.QuantizedLinear` buffers (`qweight`, `scale`, and `offset` for int4), every other
tensor as in the float model, and the format in the safetensors header:

- `openmoshi_quantization`: "int8" or "int4"; `group_size`: the int4 group size;
- `openmoshi_lm_config`: the LM config (JSON) it was made with, to name what differs when a file is
  loaded with another config;
- `openmoshi_lora_merged`: the name of the LoRA adapter merged before quantizing, if any (another
  adapter cannot be added to quantized weights);
- `openmoshi_source`: the file it was made from.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from torch import nn

from openmoshi.accel.quantize import DEFAULT_GROUP_SIZE, MODES, QuantizedLinear, quantize_lm
from openmoshi.lm.config import LMConfig
from openmoshi.loading.files import CheckpointError, Header, read_header
from openmoshi.loading.formats.official import Official

FORMAT_KEY = "openmoshi_quantization"
GROUP_KEY = "group_size"
CONFIG_KEY = "openmoshi_lm_config"
LORA_KEY = "openmoshi_lora_merged"
SOURCE_KEY = "openmoshi_source"


def saved_mode(header: Header) -> tuple[str, int]:
    """(mode, group_size) of a quantized checkpoint; CheckpointError if the header is not one we know."""
    meta = header.metadata
    mode, group = meta[FORMAT_KEY], meta.get(GROUP_KEY, str(DEFAULT_GROUP_SIZE))
    if mode not in MODES or not group.isdigit() or int(group) < 1:
        raise CheckpointError(f"{header.path}: unknown quantization {mode!r} (group size {group!r}) in the header")
    return mode, int(group)


def quantization_of(path: str | Path) -> tuple[str, int] | None:
    """(mode, group_size) when `path` is a quantized openmoshi checkpoint, else None."""
    header = read_header(path)
    return saved_mode(header) if Quantized().matches(header) else None


def save_quantized_lm(lm: nn.Module, path: str | Path, cfg: LMConfig | None = None,
                      source: str | None = None, lora: str | None = None) -> None:
    """Writes the quantized `lm` (`quantize_lm`) with its format in the header; `cfg`, `source`
    and `lora` (the merged adapter's file name) are recorded for the checks on loading. The file
    appears whole or not at all: written beside `path`, then renamed."""
    from safetensors.torch import save_file

    mode, group_size = lm.quantization
    if any(isinstance(m, QuantizedLinear) and m.qweight.numel() == 0 for m in lm.modules()):
        raise RuntimeError("this model already ran int4 on the GPU and released its packed weights: "
                           "save the quantized model before running it on CUDA")
    metadata = {FORMAT_KEY: mode, GROUP_KEY: str(group_size)}
    if cfg is not None:
        metadata[CONFIG_KEY] = json.dumps(cfg.to_dict(), sort_keys=True)
    if source is not None:
        metadata[SOURCE_KEY] = source
    if lora is not None:
        metadata[LORA_KEY] = lora
    state = {k: v.contiguous() for k, v in lm.state_dict().items()}
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(state, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class Quantized(Official):
    name = "quantized"

    def matches(self, header: Header) -> bool:
        return FORMAT_KEY in header.metadata

    def options(self, header, lora, quantize):
        mode, _ = saved_mode(header)
        path = header.path
        if quantize is not None and quantize != mode:
            raise CheckpointError(f"{path} is already quantized as {mode}, not {quantize}: leave out --quantize "
                                  f"(or give --quantize {mode}), or make an {quantize} file from the float "
                                  f"checkpoint with 'openmoshi quantize --mode {quantize}'")
        merged = header.metadata.get(LORA_KEY)
        if lora is None or (merged is not None and Path(lora).name == merged):
            return None, None  # nothing to add: the adapter it was made with is merged already
        what = f"has the LoRA adapter {merged} merged" if merged else "has no LoRA adapter merged"
        raise CheckpointError(f"{path} is quantized ({mode}) and {what}: a LoRA adapter ({Path(lora).name}) "
                              "cannot be added to quantized weights; merge it while quantizing, with "
                              "'openmoshi quantize --lora-weight LORA' on the float checkpoint")

    def tensors(self, header, state, dtype):
        return state  # written in our names and layout

    def prepare(self, header, model):
        quantize_lm(model, *saved_mode(header))
        # The scales of quantized weights stay float32, as `quantize_lm` makes them.
        return tuple(f"{name}.{b}" for name, m in model.named_modules()
                     if isinstance(m, QuantizedLinear) for b in ("scale", "offset"))

    def mismatch(self, header, cfg):
        """The config keys that differ from those the file was quantized with."""
        if CONFIG_KEY not in header.metadata:
            return None
        try:
            made = json.loads(header.metadata[CONFIG_KEY])
        except json.JSONDecodeError:
            return None
        given = json.loads(json.dumps(cfg.to_dict()))
        diff = [k for k in sorted(set(made) | set(given)) if made.get(k) != given.get(k)]
        if not diff:
            return None
        shown = ", ".join(f"{k}={made.get(k)!r} (given: {given.get(k)!r})" for k in diff[:4])
        more = f" and {len(diff) - 4} more" if len(diff) > 4 else ""
        return CheckpointError(f"{header.path} was quantized from a model with another config: {shown}{more}; "
                               "pass the config it was made with (--hf-repo REPO or --config-path config.json)")
