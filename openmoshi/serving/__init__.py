"""The real-time server and its clients: many conversations share one model, one batched step per
80 ms frame.

- `protocol`: the official websocket protocol's messages (independent of any web framework);
- `opus`: streaming Ogg/Opus in and out;
- `batcher`: the model loop, one slot per conversation;
- `waiting`: the first-come first-served line for a free slot;
- `server`: the server's logic, independent of the web framework (a conversation fed a `Socket`);
- `app`: the server as an ASGI app (`/api/chat`, `/health`, `/metrics`, the web UI in `web/`),
  and its runner on uvicorn;
- `metrics`, `tls`: Prometheus counters; certificates;
- `client`: the Python client of the protocol (files or sound card).

Offers: `server.MoshiServer`, `server.ServerConfig`, `app.asgi_app`, `app.Runner`, `batcher.Batcher`,
`client.talk_file`.

May import: openmoshi.audio, openmoshi.memory, openmoshi.mimi, openmoshi.lm, openmoshi.accel,
openmoshi.loading.
"""
