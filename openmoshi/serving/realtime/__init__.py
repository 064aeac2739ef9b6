"""The OpenAI Realtime API on the server (`/v1/realtime`), for voice-agent frameworks (the `openai`
SDK, LiveKit Agents, Pipecat): the same model slots, waiting line, auth and metrics as `/api/chat`,
with JSON events instead of the binary protocol.

- `events`: the API's server events as dicts, client events parsed and checked;
- `formats`: `audio/pcm` (24 kHz, Mimi's rate), `audio/pcmu` and `audio/pcma` (8 kHz, resampled);
- `g711`: mu-law and A-law samples;
- `vad`: when the user's speech starts and stops (Silero VAD);
- `turns`: when the model's speech starts and ends (a response), from its text and audio streams;
- `protocol`: the API's side of one session (`RealtimeProtocol`, a wire protocol of `serving.session`);
- `transcription`: the user's words from a Kyutai STT served beside Moshi (`serve --stt-model`): one
  stream per session on the STT server, its words as the input audio items' transcription events.

Offers: `protocol.RealtimeProtocol`, `protocol.realtime_auth`, `turns.ModelTurns`, `vad.SpeechDetector`,
`formats.Resampler`, `g711.encode`, `g711.decode`.

May import: openmoshi.audio, openmoshi.memory, openmoshi.mimi, openmoshi.lm, openmoshi.accel,
openmoshi.loading.
"""
