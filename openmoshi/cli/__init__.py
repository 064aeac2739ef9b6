"""The `openmoshi` command: `main` builds one parser with a subcommand per module here (codec,
bench, infer, tts, client, serve, quantize, finetune, annotate); `common` holds what they share.

Offers: `main.main`, `main.build_parser`.

May import: openmoshi, openmoshi.errors, openmoshi.audio, openmoshi.memory, openmoshi.modules, openmoshi.mimi,
openmoshi.lm, openmoshi.accel, openmoshi.loading, openmoshi.inference, openmoshi.serving, openmoshi.training,
openmoshi.bench, openmoshi.engine.
"""
