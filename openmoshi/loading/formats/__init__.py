"""The layouts an LM checkpoint file can have, one module each.

Every format is a class with the interface of `official.Official` (the released
`model.safetensors`, whose behaviour the others inherit and change where they differ):
`matches(header)`, `options(...)` (the load options it accepts), `tensors(...)` (its tensors in
our key names and layout), `prepare(model)` (modules to swap before assigning, on the meta
device) and `mismatch(...)` (a better error when the config does not fit). `loading.lm.FORMATS`
lists them, most specific first; a new format is one new module here and one entry there.

- `official`: `model.safetensors` (and a full fine-tune's `consolidated.safetensors`).
- `q8`: the released `model.q8.safetensors` (row-wise absmax int8, bitsandbytes layout).
- `quantized`: files written by `openmoshi quantize` (int8/int4, format in the header).
- `personaplex`: wraps any of them for a PersonaPlex config (dep_q = 16): the user's depth slots
  filled from the model's when the file lacks them (`load_lm` applies it from the config).

May import: openmoshi.loading.files, openmoshi.lm, openmoshi.modules, openmoshi.accel.
"""
