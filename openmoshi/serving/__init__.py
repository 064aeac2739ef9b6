"""The real-time server and its clients: many conversations share one model, one batched step per
80 ms frame.

- `protocol`: the official websocket protocol's messages (independent of any web framework);
- `opus`: streaming Ogg/Opus in and out;
- `batcher`: the model loop, one slot per conversation;
- `waiting`: the first-come first-served line for a free slot;
- `personas`: PersonaPlex personas from the query (`text_prompt`, `voice_prompt`), voices listed;
- `server`: the server's logic, independent of the web framework (a conversation fed a `Socket`);
- `app`: the server as an ASGI app (`/api/chat`, `/v1/realtime`, `/health`, `/metrics`, the web UI
  in `web/`), and its runner on uvicorn;
- `realtime`: the OpenAI Realtime API (`/v1/realtime`) on the same slots, for voice-agent frameworks;
- `cluster`: the same app as Ray Serve replicas (`serve --replicas`); `readiness`: when such a
  cluster is ready (every replica answers through the proxy);
- `metrics`, `tls`: Prometheus counters; certificates;
- `client`: the Python client of the protocol (files or sound card);
- `aec`: the client's echo canceller (WebRTC's, from the livekit package), the played audio as its
  reference.

Offers: `server.MoshiServer`, `server.ServerConfig`, `app.asgi_app`, `app.Runner`, `batcher.Batcher`,
`client.talk_file`, `aec.EchoCanceller`.

May import: openmoshi.audio, openmoshi.memory, openmoshi.mimi, openmoshi.lm, openmoshi.accel,
openmoshi.loading.
"""
