"""Offline inference on recorded audio, with the official offline frame policy, and transcripts.

- `offline`: `load(...)` -> `InferenceModel`, whose `run(inputs)` gives `InferenceResult`s;
- `transcript`: text pieces, words with their times, the JSON transcript;
- `tts`: Kyutai TTS requests (moshi-tts's JSONL) to audio and word timings (`load_tts`).
- `stt`: Kyutai STT on recorded audio (`transcribe`): words with start and stop, pause probabilities.

Offers: `offline.load`, `offline.InferenceModel`, `offline.InferenceResult`, `tts.load_tts`, `tts.TTSRequest`.

May import: openmoshi.errors, openmoshi.audio, openmoshi.modules, openmoshi.mimi, openmoshi.lm, openmoshi.accel, openmoshi.engine,
openmoshi.loading.
"""
