"""Loading the official checkpoints: LM `model.safetensors`, Mimi `tokenizer-*.safetensors`, LoRA
adapters and the SentencePiece text tokenizer.

Loading is strict: every key of the model must be in the file with the right shape and nothing
else may be there. Errors are `CheckpointError`s that name the file and the first bad key. The LM
is built on the meta device and its tensors are assigned from the file, so a 7B never exists
twice in memory.

The one rename table between official keys and ours lives here (`canonical_keys`): the official
code saves attention projections as one linear per weight set (`in_projs.{i}.weight`), the
released files as one stacked tensor (`in_proj_weight`); we store the stacked form as a module
(`in_proj.weight`).
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize

from openmoshi.lm.config import LMConfig
from openmoshi.lm.model import LMModel


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file and what is wrong."""


# ----------------------------------------------------------------------------- reading files


def read_safetensors(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, checking first that the file is whole."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint file not found: {path}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint path is not a file: {path}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path} is empty or truncated ({size} bytes): not a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise CheckpointError(f"{path} is truncated or not a safetensors file "
                                  f"(header of {n} bytes, file of {size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise CheckpointError(f"{path} is not a safetensors file (unreadable header)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is not a safetensors file (header is not a JSON object)")
    data_size = size - 8 - n
    for key, info in header.items():
        if key == "__metadata__":
            continue
        end = info.get("data_offsets", [0, 0])[1] if isinstance(info, dict) else 0
        if end > data_size:
            raise CheckpointError(f"{path} is truncated: tensor {key!r} needs bytes up to {end} "
                                  f"but the file holds {data_size} bytes of data; download it again")
    from safetensors.torch import load_file
    try:
        return load_file(str(path), device=str(device))
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"cannot read {path}: {e}") from None


def load_text_tokenizer(path: str | Path):
    """The SentencePiece text tokenizer (`tokenizer_spm_32k_3.model`)."""
    import sentencepiece

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"text tokenizer file not found: {path}")
    sp = sentencepiece.SentencePieceProcessor()
    try:
        sp.Load(str(path))
    except Exception:
        raise CheckpointError(f"{path} is not a SentencePiece model") from None
    return sp


# ----------------------------------------------------------------------------- key names

_PER_SET = re.compile(r"^(.*)\.(in|out)_projs\.(\d+)\.weight$")


def canonical_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official key spellings -> ours. `X.in_projs.{i}.weight` (one per weight set) and the released
    `X.in_proj_weight` become one stacked `X.in_proj.weight`; `X.out_projs.{i}.weight` become
    `X.out_proj.weight`."""
    out: dict[str, torch.Tensor] = {}
    groups: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for key, value in state.items():
        m = _PER_SET.match(key)
        if m:
            groups.setdefault((m.group(1), m.group(2)), {})[int(m.group(3))] = value
        elif key.endswith(".in_proj_weight"):
            out[key[: -len(".in_proj_weight")] + ".in_proj.weight"] = value
        else:
            out[key] = value
    for (prefix, kind), parts in groups.items():
        if sorted(parts) != list(range(len(parts))):
            raise CheckpointError(f"{prefix}.{kind}_projs: weight sets {sorted(parts)} are not 0..{len(parts) - 1}")
        name = f"{prefix}.{kind}_proj.weight"
        out[name] = torch.cat([parts[i] for i in range(len(parts))], dim=0)
    return out


def dequantize_q8(state: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """`model.q8.safetensors` -> float weights, without bitsandbytes. Each quantized linear has
    `X.weight` int8 [out, in] and `X.weight_scb` float [out] (row-wise absmax): W = q * scb / 127."""
    out = dict(state)
    for key in [k for k in state if k.endswith(".weight_scb")]:
        name = key[: -len("_scb")]
        if name not in state:
            raise CheckpointError(f"{key!r} has no matching {name!r} in the q8 checkpoint")
        q, scb = state[name], out.pop(key)
        if q.dtype != torch.int8 or scb.shape != q.shape[:1]:
            raise CheckpointError(f"q8 weight {name!r}: expected int8 [out, in] and scales [out], got "
                                  f"{q.dtype} {tuple(q.shape)} and {tuple(scb.shape)}")
        out[name] = (q.float() * (scb.float()[:, None] / 127.0)).to(dtype)
    return out


def load_state_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str | Path,
                      dtype: torch.dtype | None = None, keep_fp32: tuple[str, ...] = ()) -> None:
    """Checks keys and shapes against `model`, casts floats to `dtype`, assigns the tensors."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{source}: missing key {missing[0]!r}{more}; is this the right file "
                              f"for this model and config?")
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise CheckpointError(f"{source}: unexpected key {unexpected[0]!r}{more}; is this the right "
                              f"file for this model and config?")
    for key, ref in expected.items():
        value = state[key]
        if tuple(value.shape) != tuple(ref.shape):
            raise CheckpointError(f"{source}: key {key!r} has shape {tuple(value.shape)}, the model "
                                  f"expects {tuple(ref.shape)}; the config does not match this checkpoint")
        if value.dtype.is_floating_point != ref.dtype.is_floating_point:
            raise CheckpointError(f"{source}: key {key!r} has dtype {value.dtype}, expected a "
                                  f"{'float' if ref.dtype.is_floating_point else 'integer'} tensor")
        if dtype is not None and value.dtype.is_floating_point:
            state[key] = value.float() if key.startswith(keep_fp32) else value.to(dtype)
    model.load_state_dict(state, strict=True, assign=True)


# ----------------------------------------------------------------------------- models


def load_lm(path: str | Path | None, cfg: LMConfig, device: str | torch.device = "cpu",
            dtype: torch.dtype = torch.bfloat16, lora: str | Path | None = None,
            lora_scaling: float = 2.0, fuse_lora: bool = True, quantize: str | None = None) -> LMModel:
    """The LM from an official `model.safetensors` or `model.q8.safetensors` (random weights when
    path is None), or from a quantized openmoshi checkpoint (`openmoshi quantize`). `quantize`
    ("int8"/"int4") quantizes the transformer layers after loading, one layer at a time, so that
    the float weights and the quantized ones are never all held at once."""
    from openmoshi.accel.quantize import QuantizedLinear, quantize_lm, set_compute_dtype

    saved = None if path is None else _quantized_metadata(path)
    if saved is not None:
        lora = _check_quantized(path, saved, lora, quantize)
    if path is None:
        with torch.device(device):
            model = LMModel(cfg).to(dtype)
        if model.condition_provider is not None:
            model.condition_provider.float()  # like the loaded weights, see below
    else:
        state = canonical_keys(dequantize_q8(read_safetensors(path, device), dtype))
        # The official loader keeps the conditioners in float32 whatever the model dtype; the
        # scales of quantized weights stay float32 too (as `quantize_lm` makes them).
        keep_fp32 = ("condition_provider.", "fuser.")
        with torch.device("meta"):
            model = LMModel(cfg)
            if saved is not None:
                quantize_lm(model, *_saved_mode(saved))
                keep_fp32 += tuple(f"{name}.{b}" for name, m in model.named_modules()
                                   if isinstance(m, QuantizedLinear) for b in ("scale", "offset"))
        try:
            load_state_strict(model, state, path, dtype, keep_fp32=keep_fp32)
        except CheckpointError as e:
            raise _config_mismatch(path, saved, cfg) or e from None
        del state  # the model holds the tensors now; quantizing below frees each float weight
    if lora is not None:
        apply_lora(model, lora, lora_scaling, fuse=fuse_lora)
    if quantize is not None and saved is None:
        quantize_lm(model, quantize)
    set_compute_dtype(model, dtype)
    return model.eval()


def _quantized_metadata(path) -> dict[str, str] | None:
    from openmoshi.accel.quantize import quantized_metadata

    try:
        return quantized_metadata(path)
    except Exception:  # unreadable files get their clear error from read_safetensors
        return None


def _saved_mode(saved: dict[str, str]) -> tuple[str, int]:
    from openmoshi.accel.quantize import saved_mode

    try:
        return saved_mode(saved)
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def _check_quantized(path, saved: dict[str, str], lora, quantize) -> Path | None:
    """Checks the load options against a quantized checkpoint; the LoRA adapter still to apply."""
    from openmoshi.accel.quantize import LORA_KEY

    try:
        mode, _ = _saved_mode(saved)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    if quantize is not None and quantize != mode:
        raise CheckpointError(f"{path} is already quantized as {mode}, not {quantize}: leave out --quantize "
                              f"(or give --quantize {mode}), or make an {quantize} file from the float "
                              f"checkpoint with 'openmoshi quantize --mode {quantize}'")
    merged = saved.get(LORA_KEY)
    if lora is None:
        return None
    if merged is not None and Path(lora).name == merged:
        return None  # the adapter the file was made with, merged before quantizing
    what = f"has the LoRA adapter {merged} merged" if merged else "has no LoRA adapter merged"
    raise CheckpointError(f"{path} is quantized ({mode}) and {what}: a LoRA adapter ({Path(lora).name}) "
                          "cannot be added to quantized weights; merge it while quantizing, with "
                          "'openmoshi quantize --lora-weight LORA' on the float checkpoint")


def _config_mismatch(path, saved: dict[str, str] | None, cfg: LMConfig) -> CheckpointError | None:
    """For a quantized checkpoint that does not fit `cfg`: an error naming the config keys that
    differ from those it was quantized with (None when it cannot tell)."""
    from openmoshi.accel.quantize import CONFIG_KEY

    if saved is None or CONFIG_KEY not in saved:
        return None
    try:
        made = json.loads(saved[CONFIG_KEY])
    except json.JSONDecodeError:
        return None
    given = json.loads(json.dumps(cfg.to_dict()))
    diff = [k for k in sorted(set(made) | set(given)) if made.get(k) != given.get(k)]
    if not diff:
        return None
    shown = ", ".join(f"{k}={made.get(k)!r} (given: {given.get(k)!r})" for k in diff[:4])
    more = f" and {len(diff) - 4} more" if len(diff) > 4 else ""
    return CheckpointError(f"{path} was quantized from a model with another config: {shown}{more}; pass "
                           "the config it was made with (--hf-repo REPO or --config-path config.json)")


def load_mimi(path: str | Path | None, num_codebooks: int = 8, device: str | torch.device = "cpu",
              dtype: torch.dtype = torch.float32, config=None):
    """Mimi from an official `tokenizer-*.safetensors` (random weights when path is None)."""
    from openmoshi.mimi.codec import Mimi, MimiConfig

    cfg = MimiConfig.default() if config is None else config
    with torch.device(device):
        model = Mimi(cfg)
    if path is not None:
        state = canonical_keys(read_safetensors(path, device))
        load_state_strict(model, state, path)
    model.set_num_codebooks(num_codebooks)
    return model.to(dtype).eval()


# ----------------------------------------------------------------------------- LoRA


class LoRADelta(nn.Module):
    """W -> W + scaling * B @ A on rows [start, start + B.shape[0]) (Hu et al. 2021, "LoRA").

    Registered as a parametrization so the adapter stays apart from the base weight (trainable,
    removable) yet every user of the weight sees the adapted value.
    """

    def __init__(self, a: torch.Tensor, b: torch.Tensor, scaling: float, start: int = 0):
        super().__init__()
        self.lora_A = nn.Parameter(a)  # [rank, in]
        self.lora_B = nn.Parameter(b)  # [out, rank]
        self.scaling, self.start = scaling, start

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        delta = (self.lora_B @ self.lora_A).to(w.dtype) * self.scaling
        if self.start == 0 and delta.shape[0] == w.shape[0]:
            return w + delta
        stop = self.start + delta.shape[0]
        return torch.cat([w[:self.start], w[self.start:stop] + delta, w[stop:]], dim=0)


def _lora_target(model: nn.Module, name: str) -> tuple[nn.Module, str, int]:
    """Official LoRA module path -> (module owning the weight, parameter name, first row)."""
    m = re.match(r"^(.*)\.(in|out)_projs?(?:\.(\d+))?$", name)
    if m:
        attn = model.get_submodule(m.group(1))
        index = int(m.group(3) or 0)
        proj = attn.in_proj if m.group(2) == "in" else attn.out_proj
        return proj, "weight", index * proj.out_dim
    module = model.get_submodule(name)
    if not isinstance(module, nn.Linear):
        raise AttributeError(name)
    return module, "weight", 0


def apply_lora(model: nn.Module, path: str | Path, scaling: float = 2.0, fuse: bool = True) -> None:
    """Adds the adapters of an official LoRA safetensors file (`X.lora_A.weight`, `X.lora_B.weight`),
    merged into the weights (`fuse`) or kept apart as parametrizations."""
    state = read_safetensors(path)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        m = re.match(r"^(.*)\.(lora_A|lora_B)\.weight$", key)
        if not m:
            raise CheckpointError(f"{path}: unexpected key {key!r} in a LoRA file (expected *.lora_A.weight "
                                  f"and *.lora_B.weight)")
        pairs.setdefault(m.group(1), {})[m.group(2)] = value
    for name, ab in pairs.items():
        if set(ab) != {"lora_A", "lora_B"}:
            raise CheckpointError(f"{path}: {name} has {sorted(ab)} but needs both lora_A and lora_B")
        try:
            module, pname, start = _lora_target(model, name)
        except AttributeError:
            raise CheckpointError(f"{path}: key {name + '.lora_A.weight'!r} names no linear layer of the model") from None
        w = getattr(module, pname)
        a, b = ab["lora_A"].to(w.device, torch.float32), ab["lora_B"].to(w.device, torch.float32)
        if a.shape[1] != w.shape[1] or b.shape[1] != a.shape[0] or start + b.shape[0] > w.shape[0]:
            raise CheckpointError(f"{path}: adapter {name} with A {tuple(a.shape)} and B {tuple(b.shape)} "
                                  f"does not fit a weight of shape {tuple(w.shape)}")
        delta = LoRADelta(a, b, scaling, start)
        if fuse:
            with torch.no_grad():
                w.copy_(delta(w.float()).to(w.dtype))
        else:
            parametrize.register_parametrization(module, pname, delta)
