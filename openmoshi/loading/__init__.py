"""Loading models from files: checkpoints in every format we read, adapters, the text tokenizer,
and the resolution of a model's files (Hugging Face repos, local folders, hf:// and file:// URIs,
offline mode).

- `files`: safetensors headers and tensors, the official -> ours key renames, strict assignment;
- `formats/`: one module per LM checkpoint format (official, official q8, openmoshi quantized);
- `lm`, `mimi`, `tokenizer`, `lora`: each thing loaded from its file;
- `resolve`: which files make a model and where they come from (`resolve_files`);
- `model`: all of a model at once (`load_model` -> `LoadedModel`);
- `budget`: what a command will need in memory, checked before it allocates or downloads;
- `voices`: PersonaPlex voice prompts (audio files and `.pt` presets), alone or from a folder;
- `tts_voices`: Kyutai TTS voices (speaker embeddings of kyutai/tts-voices, audio prefixes).

Offers: `lm.load_lm`, `mimi.load_mimi`, `tokenizer.load_text_tokenizer`, `lora.apply_lora`,
`resolve.resolve_files`, `model.load_model`, `files.CheckpointError`, `resolve.ResolveError`.

May import: openmoshi.errors, openmoshi.audio, openmoshi.memory, openmoshi.modules, openmoshi.mimi, openmoshi.lm, openmoshi.accel.
"""
