"""The LM from a checkpoint file in any of the `formats`, or with random weights.

Loading is strict: every key of the model must be in the file with the right shape and nothing
else may be there. Memory: the model is built on the meta device, then filled one module at a time
(a linear layer, a norm, an embedding), read from the memory-mapped file straight into the dtype
asked for and, with `quantize`, each layer linear quantized before the next is read. A 7B never
exists twice in memory, nor in float32 on its way to bfloat16 or int4: the peak is the final model
plus one linear layer in float. Random weights (`path=None`) are made the same way, each module
directly in its dtype.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from openmoshi.accel.quantize import DEFAULT_GROUP_SIZE, MODES, quantize_linear, quantize_lm, set_compute_dtype
from openmoshi.errors import UserError
from openmoshi.lm.config import LMConfig
from openmoshi.lm.model import LMModel
from openmoshi.loading.files import CheckpointError, Header, cast, check_complete, check_tensors, meta_tensors, read_header
from openmoshi.loading.formats.official import Official
from openmoshi.loading.formats.personaplex import report, with_user_slots
from openmoshi.loading.formats.q8 import OfficialQ8
from openmoshi.loading.formats.quantized import Quantized
from openmoshi.loading.lora import apply_lora
from openmoshi.modules.transformer import layer_linears

FORMATS = (Quantized(), OfficialQ8(), Official())  # most specific first; Official matches any file
# The official loader keeps the conditioners in float32 whatever the model dtype.
KEEP_FP32 = ("condition_provider.", "fuser.")
_STACKED_SET = re.compile(r"^(.*)\.(in|out)_projs\.\d+\.weight(?:_scb)?$")


def checkpoint_format(header: Header) -> Official:
    """The format of a file, from its header."""
    return next(f for f in FORMATS if f.matches(header))


def _module(key: str) -> str:
    """The module a key belongs to, in the file's naming or ours: one stacked attention projection
    for all its weight sets (`X.in_projs.{i}.weight`, `X.in_proj_weight`, `X.in_proj.weight`), and
    a q8 weight with its scale."""
    m = _STACKED_SET.match(key)
    if m:
        return f"{m.group(1)}.{m.group(2)}_proj"
    for suffix in (".in_proj_weight", ".in_proj_weight_scb"):
        if key.endswith(suffix):
            return key[: -len(suffix)] + ".in_proj"
    return key.rpartition(".")[0]


def _groups(keys) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for key in keys:
        groups.setdefault(_module(key), []).append(key)
    return groups


def load_lm(path: str | Path | None, cfg: LMConfig, device: str | torch.device = "cpu",
            dtype: torch.dtype = torch.bfloat16, lora: str | Path | None = None,
            lora_scaling: float = 2.0, fuse_lora: bool = True, quantize: str | None = None,
            group_size: int = DEFAULT_GROUP_SIZE) -> LMModel:
    """The LM of `cfg` from `path` (random weights when None). `lora`: an adapter file to merge
    (`fuse_lora`) or keep apart. `quantize` ("int8"/"int4") quantizes the transformer layers as
    they are read (after the adapter is merged, when there is one: then the float model is read
    whole first), int4 in groups of `group_size` inputs."""
    if quantize not in (None, *MODES):
        raise UserError(f"unknown quantization {quantize!r}: expected one of {', '.join(MODES)} (or None)")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise UserError(f"group_size must be a positive integer, got {group_size!r}")
    layerwise = quantize if lora is None else None
    if path is None:
        model = random_lm(cfg, device, dtype, layerwise, group_size)
    else:
        header = read_header(path)
        fmt = checkpoint_format(header)
        lora, quantize = fmt.options(header, lora, quantize)
        layerwise = quantize if lora is None else None
        with torch.device("meta"):
            model = LMModel(cfg)
            keep_fp32 = KEEP_FP32 + fmt.prepare(header, model)
        if cfg.depformer_user_slots:  # PersonaPlex: the user's depth slots may be missing
            fmt = with_user_slots(fmt, model.state_dict(), cfg.depformer_user_slots)
        try:
            _read(model, header, fmt, device, dtype, keep_fp32, layerwise, group_size)
        except CheckpointError as e:
            raise fmt.mismatch(header, cfg) or e from None
        report(fmt, path)
    if lora is not None:
        apply_lora(model, lora, lora_scaling, fuse=fuse_lora)
    if quantize is not None and layerwise is None:
        quantize_lm(model, quantize, group_size)
    set_compute_dtype(model, dtype)
    return model.eval()


def _read(model: LMModel, header: Header, fmt: Official, device, dtype, keep_fp32, quantize, group_size) -> None:
    """Fills the meta `model` from the file, one module at a time (see the module doc)."""
    from safetensors import safe_open

    expected = model.state_dict()
    whole = fmt.tensors(header, meta_tensors(header), dtype)  # names and shapes, before any data
    check_complete(expected, whole, header.path)
    check_tensors(expected, whole, header.path)
    linears = _layer_linears(model)
    with safe_open(str(header.path), framework="pt", device=str(device)) as f:
        for module, keys in _groups(f.keys()).items():
            state = fmt.tensors(header, {k: f.get_tensor(k) for k in keys}, dtype)
            cast(state, dtype, keep_fp32)
            model.load_state_dict(state, strict=False, assign=True)
            if quantize and module in linears:
                quantize_linear(*linears[module], quantize, group_size)
    if quantize:
        quantize_lm(model, quantize, group_size)  # marks the model (every layer linear is quantized already)


def _layer_linears(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """{module name: (owner, attribute)} of the transformer layers' linears, what `quantize` swaps."""
    names = {id(m): n for n, m in model.named_modules()}
    return {f"{names[id(owner)]}.{attr}": (owner, attr) for owner, attr in layer_linears(model)}


def random_lm(cfg: LMConfig, device, dtype: torch.dtype, quantize: str | None = None,
              group_size: int = DEFAULT_GROUP_SIZE) -> LMModel:
    """Random weights, made one module at a time directly in `dtype`, each layer linear quantized
    as it is made."""
    with torch.device("meta"):
        model = LMModel(cfg).to(dtype)
    if model.condition_provider is not None:
        model.condition_provider.float()  # like loaded weights
    linears = list(_layer_linears(model).values())
    for owner, attr in linears:
        _materialize(getattr(owner, attr), device)
        if quantize:
            quantize_linear(owner, attr, quantize, group_size)
    _materialize(model, device)  # the rest: embeddings, norms, heads
    if quantize:
        quantize_lm(model, quantize, group_size)  # marks the model (every layer linear is quantized already)
    return model


def _materialize(module: nn.Module, device) -> None:
    """Allocates the meta parameters of `module` and initialises them, children before parents (a
    parent's reset_parameters may rescale what its children made). Modules made already are skipped."""
    if not any(p.is_meta for p in module.parameters()):
        return
    for child in module.children():
        _materialize(child, device)
    if any(p.is_meta for p in module.parameters(recurse=False)):
        module.to_empty(device=device, recurse=False)
    if hasattr(module, "reset_parameters"):
        module.reset_parameters()
