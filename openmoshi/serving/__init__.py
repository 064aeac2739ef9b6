"""The real-time server and its clients: many conversations share one model, one batched step per
80 ms frame.

- `server`: the server's logic, independent of the web framework: seats, the waiting line, auth,
  health; a conversation is a `session` on a `Socket`;
- `session`: one client's conversation (its seat, outbox, timeouts, frame assembler), whatever its
  wire protocol;
- `chat` (+ `protocol`, `opus`): the official `/api/chat` protocol; `realtime`: the OpenAI Realtime
  API (`/v1/realtime`) for voice-agent frameworks; `asr`: moshi-server's `/api/asr-streaming` for a
  Kyutai STT model; `tts` (+ `tts_loop`, its model loop): moshi-server's `/api/tts_streaming` for
  a Kyutai TTS model; each a wire protocol class of a session;
- `loop`: the model loop, a worker thread that owns the engine's rows and ticks once per frame;
  `prompts`: persona prompt phases inside its ticks, and their cache;
- `params`: what a client may set, checked at the edge; `personas`: PersonaPlex personas from the
  query (`text_prompt`, `voice_prompt`), voices listed;
- `waiting`: the first-come first-served line for a free seat;
- `hosting`: several models in one process (`serve --stt-model/--tts-model`), each its own server,
  one app; `build`: a model's server from its files (the CLI's and each replica's);
- `app`: the server as an ASGI app (`/api/chat`, `/v1/realtime`, `/health`, `/metrics`, the web UI
  in `web/`), and its runner on uvicorn; `cluster`: the same app as Ray Serve replicas (`serve
  --replicas`); `readiness`: when such a cluster is ready (every replica answers through the proxy);
- `metrics`, `tls`: Prometheus counters; certificates;
- `client`, `latency`, `jitter`: the Python client of the protocol (files or sound card), the latency it
  hears, and its speaker's jitter buffer; `aec`: the client's echo canceller (WebRTC's, from the livekit package).

Offers: `server.MoshiServer`, `server.ServerConfig`, `app.asgi_app`, `app.Runner`, `loop.ModelLoop`,
`session.Session`, `client.talk_file`, `aec.EchoCanceller`.

May import: openmoshi.errors, openmoshi.audio, openmoshi.memory, openmoshi.mimi, openmoshi.lm, openmoshi.accel,
openmoshi.loading, openmoshi.engine, openmoshi.inference (a served TTS model is the offline one).
"""
