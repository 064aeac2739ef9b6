"""Fine-tuning the LM on conversations in the moshi-finetune data layout (`openmoshi finetune`).

The data pipeline is small steps, each testable alone:
manifest (`manifest`) -> word alignments (`manifest.read_alignments`, or `annotate` with an ASR)
-> text stream on the 12.5 Hz grid (`text_stream`) -> Mimi codes encoded once into a cache
(`codes_cache`) -> segments of `--duration` seconds (`segments`).
Training: LoRA adapters (`lora`), the loss as a plain function (`loss`), distributed set-up in one
place (`distributed`, FSDP2 over torchrun), resumable state and the outputs users load
(`checkpoints`), the loop (`loop`) with its `metrics.jsonl`, and the merged export (`export`).

Offers: `loop.train`, `config.TrainConfig`, `export.export_run`, `lora.add_lora`.

May import: openmoshi.errors, openmoshi.audio, openmoshi.modules, openmoshi.mimi, openmoshi.lm, openmoshi.accel,
openmoshi.loading.
"""
