"""One streaming engine under every entry point: `serve` (and each Ray replica), offline inference and
`bench` all run a model through an `Engine`.

- `speed`: the speed paths of a device, in one registry (what is swapped, what the start-up self-check
  said, the OPENMOSHI_NO_* switches read once); `autotune`: the CPU paths chosen by measuring them on
  the machine (`--mimi-fast auto`), cached;
- `engine`: `Engine.build(model, batch)`: the states of `batch` slots, the condition a model takes,
  the memory they need, and Mimi encode / LM step / Mimi decode over prefixes of the slots (buckets),
  as CUDA graphs where they pay;
- `startup`: a model loaded and made fast, the one start-up of every command.

Offers: `engine.Engine`, `speed.SpeedConfig`, `speed.Speed`, `startup.start`.

May import: openmoshi.errors, openmoshi.audio, openmoshi.memory, openmoshi.modules, openmoshi.mimi, openmoshi.lm,
openmoshi.accel, openmoshi.loading.
"""
