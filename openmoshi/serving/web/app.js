// The openmoshi web UI: microphone -> Opus (WebCodecs) -> Ogg pages -> websocket /api/chat,
// and back: Ogg pages -> Opus packets -> PCM -> jitter-buffered playback in an AudioWorklet.
// It measures the latency it hears (latency.js) and shows it with the other statistics.
import * as P from "./protocol.js";
import { OggOpusReader, OggOpusWriter, opusPacketSamples48k } from "./ogg.js";
import { LatencyMeter, percentile } from "./latency.js";

const $ = (id) => document.getElementById(id);
const PING_INTERVAL_MS = 2000;
const SILENCE_TIMEOUT_MS = 10000; // as the official client: give up after 10 s without a message
const LATENCY_WINDOW_MS = 10000; // the latency shown is over the last 10 s

let session = null; // the live conversation, or null
let recording = null; // {user: [], model: [], start} of the last conversation, kept after it ends

// Exposed for tests and the curious: window.openmoshi.stats is the live statistics object.
window.openmoshi = { get stats() { return session ? session.stats : lastStats; }, get session() { return session; } };
let lastStats = null;

function setState(state, text) {
  document.body.dataset.state = state;
  $("status").textContent = text ?? state;
}

function showError(message) {
  $("error").textContent = message;
  if (session) session.stats.errors.push(message);
}

function chatUrl(settings) {
  // Relative to the page, so that the UI works behind a path prefix and over https from any host.
  const url = new URL("api/chat", window.location.href);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  for (const name of [...P.QUERY_PARAMS, ...P.PERSONA_PARAMS]) {
    const value = settings.get(name);
    if (value !== null && String(value).trim() !== "") url.searchParams.set(name, String(value).trim());
  }
  return url;
}

function newStats() {
  return {
    state: "connecting", connectStartMs: performance.now(), handshakeMs: null, firstAudioMs: null,
    messagesIn: 0, messagesOut: 0, bytesIn: 0, bytesOut: 0,
    audioSentS: 0, audioReceivedS: 0, audioPlayedS: 0, droppedS: 0, underruns: 0, bufferedMs: 0,
    textPieces: 0, rttMs: null, decodeErrors: 0, errors: [], queuePosition: null, queueLength: null,
    // Over the last 10 s: the latency on arrival (latency.js), and as heard: plus the jitter buffer's
    // wait and the audio output's own latency (as the browser reports it).
    latencyP50Ms: null, latencyP90Ms: null, latencyChunks: 0, heardP50Ms: null, heardP90Ms: null,
    bufferTargetMs: null, outputLatencyMs: null,
  };
}

async function connect() {
  $("error").textContent = "";
  if (!window.AudioEncoder || !window.AudioDecoder) {
    showError("This browser has no WebCodecs audio support (AudioEncoder/AudioDecoder); use a recent Chromium, Edge or Safari.");
    return;
  }
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    showError("No microphone access: browsers only allow it on https:// or http://localhost.");
    return;
  }
  const settings = new FormData($("settings"));
  const s = { stats: newStats(), closed: false, timers: [], meter: new LatencyMeter(P.FRAME_SIZE, LATENCY_WINDOW_MS),
    sentSamples: 0, receivedSamples: 0, decodedSamples: 0, tags: [], heard: [] };
  session = s;
  $("connect").disabled = true;
  $("disconnect").disabled = false;
  $("transcript").textContent = "";
  setState("connecting");
  try {
    s.audio = new AudioContext({ sampleRate: P.SAMPLE_RATE, latencyHint: "interactive" });
    await s.audio.audioWorklet.addModule(new URL("worklets.js", import.meta.url));
    s.mic = await navigator.mediaDevices.getUserMedia({
      audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true, channelCount: 1 },
    });
  } catch (e) {
    stop(`Microphone unavailable: ${e.message || e}`);
    return;
  }
  if (s.closed) return;
  await s.audio.resume();
  setupPlayback(s, msSetting(settings, "buffer_ms", 20), msSetting(settings, "max_buffer_ms", 320));
  recording = { user: [], model: [], start: null, sampleRate: s.audio.sampleRate };

  s.ws = new WebSocket(chatUrl(settings));
  s.ws.binaryType = "arraybuffer";
  s.lastMessageMs = performance.now();
  s.ws.onmessage = (e) => onMessage(s, e.data);
  s.ws.onerror = () => { if (!s.closed) showError("Websocket error (server unreachable, refused, or not a Moshi server?)"); };
  s.ws.onclose = (e) => {
    // A refusal (busy, auth) arrives as an error message just before the close: keep showing it.
    const refused = s.stats.errors.length ? s.stats.errors[s.stats.errors.length - 1] : null;
    stop(s.stats.handshakeMs === null && !s.closed
      ? refused ?? `Connection closed before the handshake (code ${e.code}${e.reason ? ": " + e.reason : ""})` : null);
  };
  s.timers.push(setInterval(() => {
    if (performance.now() - s.lastMessageMs > SILENCE_TIMEOUT_MS) stop("No message from the server for 10 s.");
  }, 1000));
  s.timers.push(setInterval(() => { updateLatency(s); renderStats(s.stats); }, 250));
}

function msSetting(settings, name, fallback) {
  const value = Number(settings.get(name));
  return settings.get(name) !== "" && Number.isFinite(value) && value >= 0 ? value : fallback;
}

function updateLatency(s) {
  const now = performance.now(), st = s.stats;
  const arrival = s.meter.summary(now);
  st.latencyChunks = arrival.chunks;
  st.latencyP50Ms = arrival.p50;
  st.latencyP90Ms = arrival.p90;
  st.outputLatencyMs = 1000 * ((s.audio.baseLatency || 0) + (s.audio.outputLatency || 0));
  while (s.heard.length && s.heard[0][0] < now - LATENCY_WINDOW_MS) s.heard.shift();
  const heard = s.heard.map(([, ms]) => ms + st.outputLatencyMs);
  st.heardP50Ms = percentile(heard, 50);
  st.heardP90Ms = percentile(heard, 90);
}

function setupPlayback(s, startMs, maxMs) {
  s.playback = new AudioWorkletNode(s.audio, "playback", {
    numberOfInputs: 0, outputChannelCount: [1], processorOptions: { startMs, maxMs },
  });
  s.playback.connect(s.audio.destination);
  s.playback.port.onmessage = (e) => {
    if (e.data.stats) {
      const st = e.data.stats;
      s.stats.audioPlayedS = st.played / P.SAMPLE_RATE;
      s.stats.droppedS = st.dropped / P.SAMPLE_RATE;
      s.stats.underruns = st.underruns;
      s.stats.bufferedMs = st.bufferedMs;
      s.stats.bufferTargetMs = st.targetMs;
      const now = performance.now();
      for (const ms of st.heardMs) s.heard.push([now, ms]);
    } else {
      record("model", e.data.frame, e.data.samples);
      $("out-level").value = peak(e.data.samples);
    }
  };
  s.decoder = new AudioDecoder({
    output: (data) => onDecoded(s, data),
    error: (e) => { s.stats.decodeErrors++; showError(`Opus decoder: ${e.message}`); },
  });
  s.decoder.configure({ codec: "opus", sampleRate: P.SAMPLE_RATE, numberOfChannels: 1 });
  s.reader = new OggOpusReader();
  s.decodedUs = 0;
}

async function startMicrophone(s) {
  const writer = new OggOpusWriter({ channels: 1, inputSampleRate: P.SAMPLE_RATE });
  let headersSent = false;
  s.encoder = new AudioEncoder({
    output: (chunk) => {
      if (s.closed || s.ws.readyState !== WebSocket.OPEN) return;
      if (!headersSent) { send(s, P.encodeAudio(writer.headers())); headersSent = true; }
      const data = new Uint8Array(chunk.byteLength);
      chunk.copyTo(data);
      const durationUs = chunk.duration || opusPacketSamples48k(data) * 1e6 / 48000;
      send(s, P.encodeAudio(writer.packet(data, durationUs)));
      s.stats.audioSentS += durationUs / 1e6;
      s.sentSamples += Math.round(durationUs * P.SAMPLE_RATE / 1e6);
      s.meter.sent(s.sentSamples, performance.now()); // handed to the websocket: the latency counts from here
    },
    error: (e) => showError(`Opus encoder: ${e.message}`),
  });
  const config = {
    codec: "opus", sampleRate: P.SAMPLE_RATE, numberOfChannels: 1, bitrate: 32000,
    opus: { frameDuration: 20000 }, // 20 ms packets: one page each, sent at once
  };
  const support = await AudioEncoder.isConfigSupported(config);
  if (!support.supported) throw new Error("this browser cannot encode 24 kHz mono Opus");
  s.encoder.configure(config);
  const source = s.audio.createMediaStreamSource(s.mic);
  s.capture = new AudioWorkletNode(s.audio, "capture", { numberOfOutputs: 0 });
  s.capture.port.onmessage = (e) => {
    if (s.closed) return;
    const { frame, samples } = e.data;
    record("user", frame, samples);
    $("mic-level").value = peak(samples);
    s.encoder.encode(new AudioData({
      format: "f32-planar", sampleRate: P.SAMPLE_RATE, numberOfFrames: samples.length,
      numberOfChannels: 1, timestamp: Math.round(frame * 1e6 / P.SAMPLE_RATE), data: samples,
    }));
  };
  source.connect(s.capture);
  s.source = source;
}

function send(s, bytes) {
  s.ws.send(bytes);
  s.stats.messagesOut++;
  s.stats.bytesOut += bytes.length;
}

function onMessage(s, data) {
  if (s.closed) return;
  s.lastMessageMs = performance.now();
  s.stats.messagesIn++;
  s.stats.bytesIn += data.byteLength;
  let msg;
  try {
    msg = P.parse(data);
  } catch (e) {
    showError(`Bad message from the server: ${e.message}`);
    return;
  }
  switch (msg.kind) {
    case P.KIND_HANDSHAKE:
      if (s.stats.handshakeMs !== null) return;
      s.stats.handshakeMs = performance.now() - s.stats.connectStartMs;
      s.stats.state = "connected";
      setState("connected");
      startMicrophone(s).catch((e) => stop(`Microphone: ${e.message || e}`));
      s.timers.push(setInterval(() => { s.pingSentMs = performance.now(); send(s, P.encodePing()); }, PING_INTERVAL_MS));
      break;
    case P.KIND_AUDIO: {
      const packets = s.reader.append(msg.data);
      for (const packet of packets) {
        const us = opusPacketSamples48k(packet) * 1e6 / 48000;
        s.decoder.decode(new EncodedAudioChunk({ type: "key", timestamp: s.decodedUs, duration: us, data: packet }));
        s.decodedUs += us;
        s.receivedSamples += opusPacketSamples48k(packet) / 2; // 48 kHz counts, 24 kHz audio
      }
      // Per message, as the Python client measures (one 80 ms frame each from a Moshi server): the
      // latency of its last sample, which tags the decoded piece that ends the message.
      if (packets.length) s.tags.push([s.receivedSamples, s.meter.received(s.receivedSamples, performance.now())]);
      break;
    }
    case P.KIND_TEXT:
      s.stats.textPieces++;
      $("transcript").append(msg.data);
      $("transcript").scrollTop = $("transcript").scrollHeight;
      break;
    case P.KIND_ERROR:
      showError(`Server: ${msg.data}`);
      break;
    case P.KIND_METADATA: {
      // A busy server keeps us waiting for a slot, telling our place every few seconds.
      const place = P.queuePosition(msg.data);
      if (place && s.stats.handshakeMs === null) {
        s.stats.state = "waiting";
        s.stats.queuePosition = place.position;
        s.stats.queueLength = place.length;
        setState("waiting", `Waiting for a free slot: position ${place.position} of ${place.length}`);
      } else {
        $("metadata").textContent = JSON.stringify(msg.data, null, 2);
      }
      break;
    }
    case P.KIND_PING:
      if (s.pingSentMs != null) { s.stats.rttMs = performance.now() - s.pingSentMs; s.pingSentMs = null; }
      break;
    default: // control: nothing to do on this side
      break;
  }
}

function onDecoded(s, data) {
  let pcm = new Float32Array(data.numberOfFrames);
  data.copyTo(pcm, { planeIndex: 0, format: "f32-planar" });
  if (data.sampleRate !== P.SAMPLE_RATE) pcm = resample(pcm, data.sampleRate, P.SAMPLE_RATE);
  data.close();
  if (s.closed) return;
  if (s.stats.firstAudioMs === null) s.stats.firstAudioMs = performance.now() - s.stats.connectStartMs;
  s.stats.audioReceivedS += pcm.length / P.SAMPLE_RATE;
  s.decodedSamples += pcm.length;
  // The piece that ends a message carries the message's latency on arrival; the worklet adds how
  // long its last sample waits there (the latency as heard).
  let latencyMs = null;
  while (s.tags.length && s.tags[0][0] <= s.decodedSamples) latencyMs = s.tags.shift()[1];
  s.playback.port.postMessage({ pcm, latencyMs }, [pcm.buffer]);
}

// Linear interpolation; only used if a browser decodes at another rate than asked.
function resample(x, from, to) {
  const n = Math.floor(x.length * to / from);
  const y = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    const t = i * from / to, j = Math.floor(t), f = t - j;
    y[i] = (x[j] ?? 0) * (1 - f) + (x[j + 1] ?? x[j] ?? 0) * f;
  }
  return y;
}

function peak(samples) {
  let m = 0;
  for (let i = 0; i < samples.length; i++) m = Math.max(m, Math.abs(samples[i]));
  return Math.min(1, m);
}

function record(track, frame, samples) {
  if (!recording) return;
  if (recording.start === null) recording.start = frame;
  recording[track].push({ frame, samples: samples.slice() });
  $("download").disabled = false;
}

function stop(error) {
  const s = session;
  if (!s || s.closed) return;
  s.closed = true;
  for (const t of s.timers) clearInterval(t);
  if (s.ws && s.ws.readyState <= WebSocket.OPEN) s.ws.close(1000);
  if (s.mic) for (const t of s.mic.getTracks()) t.stop();
  for (const c of [s.encoder, s.decoder]) if (c && c.state !== "closed") c.close();
  if (s.audio) s.audio.close();
  s.stats.state = error ? "error" : "closed";
  renderStats(s.stats);
  lastStats = s.stats;
  session = null;
  $("connect").disabled = false;
  $("disconnect").disabled = true;
  if (error) { $("error").textContent = error; setState("error", "disconnected"); } else setState("idle", "disconnected");
}

// A 16-bit stereo wav: left is you (the microphone after echo cancellation), right is Moshi as
// played, both on the audio context's clock.
function recordingWav() {
  const rate = recording.sampleRate;
  let end = 0;
  for (const track of ["user", "model"]) {
    for (const c of recording[track]) end = Math.max(end, c.frame - recording.start + c.samples.length);
  }
  const buf = new ArrayBuffer(44 + end * 4);
  const v = new DataView(buf);
  const text = (o, t) => { for (let i = 0; i < t.length; i++) v.setUint8(o + i, t.charCodeAt(i)); };
  text(0, "RIFF"); v.setUint32(4, 36 + end * 4, true); text(8, "WAVE");
  text(12, "fmt "); v.setUint32(16, 16, true); v.setUint16(20, 1, true); v.setUint16(22, 2, true);
  v.setUint32(24, rate, true); v.setUint32(28, rate * 4, true); v.setUint16(32, 4, true); v.setUint16(34, 16, true);
  text(36, "data"); v.setUint32(40, end * 4, true);
  ["user", "model"].forEach((track, channel) => {
    for (const c of recording[track]) {
      const at = c.frame - recording.start;
      for (let i = 0; i < c.samples.length; i++) {
        if (at + i < 0) continue;
        const x = Math.max(-1, Math.min(1, c.samples[i]));
        v.setInt16(44 + (at + i) * 4 + channel * 2, Math.round(x * 32767), true);
      }
    }
  });
  return new Blob([buf], { type: "audio/wav" });
}

function download() {
  if (!recording) return;
  const a = document.createElement("a");
  a.href = URL.createObjectURL(recordingWav());
  a.download = `openmoshi-${new Date().toISOString().replace(/[:.]/g, "-")}.wav`;
  a.click();
  setTimeout(() => URL.revokeObjectURL(a.href), 10000);
}

const fmt = (x, digits = 1, unit = "") => (x === null || x === undefined ? "—" : `${x.toFixed(digits)}${unit}`);
const pair = (a, b) => (a === null ? "—" : `${fmt(a, 0)} / ${fmt(b, 0)} ms`);

function renderStats(st) {
  const elapsed = (performance.now() - st.connectStartMs) / 1000;
  const rows = [
    ["State", st.state === "waiting" ? `waiting (${st.queuePosition} of ${st.queueLength})` : st.state],
    ["Connected for", fmt(elapsed, 1, " s")],
    ["Handshake after", fmt(st.handshakeMs, 0, " ms")],
    ["First audio after", fmt(st.firstAudioMs, 0, " ms")],
    ["Ping round trip", fmt(st.rttMs, 0, " ms")],
    ["Audio sent", fmt(st.audioSentS, 1, " s")],
    ["Audio received", fmt(st.audioReceivedS, 1, " s")],
    ["Model behind mic", fmt(Math.max(0, st.audioSentS - st.audioReceivedS) * 1000, 0, " ms")],
    ["Latency p50 / p90 (10 s)", pair(st.latencyP50Ms, st.latencyP90Ms)],
    ["As heard p50 / p90", pair(st.heardP50Ms, st.heardP90Ms)],
    ["Jitter buffer target", fmt(st.bufferTargetMs, 0, " ms")],
    ["Playback buffer", fmt(st.bufferedMs, 0, " ms")],
    ["Audio output latency", fmt(st.outputLatencyMs, 0, " ms")],
    ["Audio played", fmt(st.audioPlayedS, 1, " s")],
    ["Dropped to catch up", fmt(st.droppedS * 1000, 0, " ms")],
    ["Buffer underruns", String(st.underruns)],
    ["Messages in / out", `${st.messagesIn} / ${st.messagesOut}`],
    ["Data in / out", `${(st.bytesIn / 1024).toFixed(0)} / ${(st.bytesOut / 1024).toFixed(0)} KiB`],
    ["Text pieces", String(st.textPieces)],
  ];
  const table = $("stats");
  table.replaceChildren(...rows.map(([k, val]) => {
    const tr = document.createElement("tr");
    for (const t of [k, val]) { const td = document.createElement("td"); td.textContent = t; tr.append(td); }
    return tr;
  }));
}

async function loadVoices() {
  // The server's persona voices (serve --voice-prompt-dir); the list stays hidden without any.
  try {
    const response = await fetch(new URL(P.VOICES_ROUTE, window.location.href));
    if (!response.ok) return;
    const { voices } = await response.json();
    for (const name of voices) {
      const option = document.createElement("option");
      option.value = option.textContent = name;
      $("voices").append(option);
    }
    $("voice-label").hidden = voices.length === 0;
  } catch (e) {
    // an older server: no voices
  }
}

$("connect").addEventListener("click", () => connect());
loadVoices();
$("disconnect").addEventListener("click", () => stop(null));
$("download").addEventListener("click", download);
renderStats({ ...newStats(), state: "idle" });
