"""The call-site speed wrapper of a loaded model for streaming use (server, offline inference).

On CPU, Mimi's streaming steps run through `mimi_cpu.fast_cpu` (same codes as the reference,
about 2x faster per frame); on CUDA, the LM's and Mimi's norms, RoPE + cache writes and gating run
as fused Triton kernels (`fused.apply`; OPENMOSHI_NO_FUSED_KERNELS=1 keeps the reference modules).
`checked_fast_streaming` then runs the start-up self-check (`self_check`) of the fused modules and
the graphed step, and turns off whichever fails, with one warning.
"""

from __future__ import annotations

from dataclasses import replace

from openmoshi.accel import fused
from openmoshi.accel.cuda_graph import ENV_OFF as GRAPHS_OFF
from openmoshi.accel.env import env_disabled
from openmoshi.accel.mimi_cpu import fast_cpu


def with_fast_streaming(model):
    """`model`: a `loading.model.LoadedModel` (any dataclass with `lm`, `mimi` and `device`);
    the same model with the fast paths of its device."""
    if model.device.type == "cuda":
        if fused.wanted(model.device):
            fused.apply(model.lm)
            fused.apply(model.mimi)
        return model
    if model.device.type == "cpu":
        return replace(model, mimi=fast_cpu(model.mimi))
    return model


def checked_fast_streaming(model, cuda_graph: bool | None = None):
    """`with_fast_streaming`, then on CUDA the self-check of what it switched on and of the CUDA
    graphs (unless `cuda_graph` is False): (model, cuda_graph), the model back on the reference
    modules if the fused ones failed, cuda_graph False if the graphed step failed."""
    from openmoshi.accel.self_check import check_fast_paths, report

    model = with_fast_streaming(model)
    if model.device.type != "cuda":
        return model, cuda_graph
    use_fused = fused.is_applied(model.lm)
    use_graphs = cuda_graph is True or (cuda_graph is None and not env_disabled(GRAPHS_OFF))
    if not (use_fused or use_graphs):
        return model, cuda_graph
    result = check_fast_paths(model.lm, use_fused, use_graphs)
    if not result.fused_ok:
        fused.unapply(model.mimi)
    report(result)
    return model, (False if not result.graphs_ok else cuda_graph)
