"""The LM from a checkpoint file in any of the `formats`, or with random weights.

Loading is strict: every key of the model must be in the file with the right shape and nothing
else may be there. The model is built on the meta device and its tensors are assigned from the
file, so a 7B never exists twice in memory.
"""

from __future__ import annotations

from pathlib import Path

import torch

from openmoshi.accel.quantize import quantize_lm, set_compute_dtype
from openmoshi.lm.config import LMConfig
from openmoshi.lm.model import LMModel
from openmoshi.loading.files import CheckpointError, Header, load_state_strict, read_header, read_safetensors
from openmoshi.loading.formats.official import Official
from openmoshi.loading.formats.q8 import OfficialQ8
from openmoshi.loading.formats.quantized import Quantized
from openmoshi.loading.lora import apply_lora

FORMATS = (Quantized(), OfficialQ8(), Official())  # most specific first; Official matches any file
# The official loader keeps the conditioners in float32 whatever the model dtype.
KEEP_FP32 = ("condition_provider.", "fuser.")


def checkpoint_format(header: Header) -> Official:
    """The format of a file, from its header."""
    return next(f for f in FORMATS if f.matches(header))


def load_lm(path: str | Path | None, cfg: LMConfig, device: str | torch.device = "cpu",
            dtype: torch.dtype = torch.bfloat16, lora: str | Path | None = None,
            lora_scaling: float = 2.0, fuse_lora: bool = True, quantize: str | None = None) -> LMModel:
    """The LM of `cfg` from `path` (random weights when None). `lora`: an adapter file to merge
    (`fuse_lora`) or keep apart. `quantize` ("int8"/"int4") quantizes the transformer layers
    after loading, one layer at a time, so that the float weights and the quantized ones are never
    all held at once."""
    if path is None:
        with torch.device(device):
            model = LMModel(cfg).to(dtype)
        if model.condition_provider is not None:
            model.condition_provider.float()  # like loaded weights
    else:
        header = read_header(path)
        fmt = checkpoint_format(header)
        lora, quantize = fmt.options(header, lora, quantize)
        state = fmt.tensors(header, read_safetensors(path, device), dtype)
        with torch.device("meta"):
            model = LMModel(cfg)
            keep_fp32 = KEEP_FP32 + fmt.prepare(header, model)
        try:
            load_state_strict(model, state, path, dtype, keep_fp32=keep_fp32)
        except CheckpointError as e:
            raise fmt.mismatch(header, cfg) or e from None
        del state  # the model holds the tensors now; quantizing below frees each float weight
    if lora is not None:
        apply_lora(model, lora, lora_scaling, fuse=fuse_lora)
    if quantize is not None:
        quantize_lm(model, quantize)
    set_compute_dtype(model, dtype)
    return model.eval()
