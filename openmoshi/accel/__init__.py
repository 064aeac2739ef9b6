"""Speed paths, applied to built models at the call site (the eager modules stay the definition);
which of them run on a device is decided in one place, `openmoshi.engine.speed`.

- `cuda_graph`: the per-frame steps as CUDA graphs (`GraphedStep`, `graphed`);
- `fused`, `int8_kernel`: Triton kernels for CUDA (fused norms/RoPE/gating, int8 GEMV);
- `quantize`: weight-only int8/int4 linears swapped into the transformer layers;
- `mimi_cpu`: the CPU fast path of streaming Mimi;
- `self_check`: the start-up check of the fused and graphed paths against the reference;
- `env`: the OPENMOSHI_NO_* switches.

Offers: `cuda_graph.GraphedStep`, `cuda_graph.graphed`, `quantize.quantize_lm`,
`quantize.QuantizedLinear`, `mimi_cpu.fast_cpu`, `fused.apply`,
`self_check.check_fast_paths`.

May import: openmoshi.modules, openmoshi.mimi, openmoshi.lm.
"""
