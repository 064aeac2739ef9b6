"""The Moshi language model and its generation loop.

- `config`: `LMConfig` / `ModelConfig` from the official `config.json`, the built-in configs
  (`MOSHI_7B`, `tiny`, `small`) and the special token ids;
- `conditioners`: the conditioning of the 2B models (Hibiki) and of Kyutai TTS (lookup tables
  summed in, speaker embeddings cross-attended to);
- `model`: `LMModel`, the temporal transformer over text + audio streams and the depth transformer
  over codebooks, with the training forward (`LMModel.forward`) and the streaming steps;
- `delays`: bookkeeping between frame time and the delayed streams;
- `sampling`: per-slot temperature and top-k sampling;
- `generate`: one 80 ms frame per call, `init_state` / `step` on caller-owned state, with forced
  tokens;
- `persona`: PersonaPlex's prompt phase (voice, text, spacers) as frames of forced tokens;
- `inject`: a text the model says in its own voice, laid out on its text stream's grid as forced tokens;
- `tts_script`: Kyutai TTS's script (words, breaks, speaker turns) and the state machine that
  feeds it to the LM;
- `tts`: Kyutai TTS generation (`tts_step` on caller-owned state, `generate` offline).
- `stt`: Kyutai STT's text stream as timed words (moshi-server's rule) and its timing.

Offers: `config.LMConfig`, `config.ModelConfig`, `config.load_model_config`, `config.MOSHI_7B`,
`model.LMModel`, `sampling.SamplingConfig`, `generate.init_state`, `generate.step`,
`persona.build_prompt`, `persona.run_prompts`, `tts.tts_spec`, `tts.TTSSettings`, `tts.generate`,
`tts.tts_step`, `tts_script.script_to_entries`.

May import: openmoshi.errors, openmoshi.modules.
"""
