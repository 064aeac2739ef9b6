"""Mimi, the streaming neural audio codec: 24 kHz mono audio <-> 12.5 Hz frames of discrete codes.

- `config`: `MimiConfig` and its parts, from the official JSON or the released defaults;
- `conv`: causal 1-D convolutions, whole-signal or streamed;
- `seanet`: the SEANet convolutional encoder and decoder;
- `quantizer`: the split residual vector quantizer;
- `codec`: `Mimi` (encode, decode, and their streaming steps on caller-owned state).

Offers: `codec.Mimi`, `codec.FRAME_SIZE`, `config.MimiConfig`.

May import: openmoshi.modules.
"""
