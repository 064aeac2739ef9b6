// The binary websocket protocol of /api/chat: first byte is the kind, the rest is the payload.
// Keep in step with openmoshi/serving/protocol.py (tests/test_web_protocol.py checks that both agree).

export const KIND_HANDSHAKE = 0;
export const KIND_AUDIO = 1;
export const KIND_TEXT = 2;
export const KIND_CONTROL = 3;
export const KIND_METADATA = 4;
export const KIND_ERROR = 5;
export const KIND_PING = 6;
export const KIND_INJECT = 7; // openmoshi's own: UTF-8 text for the model to say (client to server)

export const CONTROL_START = 0;
export const CONTROL_END_TURN = 1;
export const CONTROL_PAUSE = 2;
export const CONTROL_RESTART = 3;

// Query parameters the server reads from the websocket URL (the official web client's names).
export const QUERY_PARAMS = [
  "text_temperature", "text_topk", "audio_temperature", "audio_topk", "pad_mult",
  "text_seed", "audio_seed", "repetition_penalty", "repetition_penalty_context", "worker_auth_id",
];

// A persona (PersonaPlex models): its role and a voice of GET api/voices (openmoshi/serving/personas.py).
export const PERSONA_PARAMS = ["text_prompt", "voice_prompt"];
export const VOICES_ROUTE = "api/voices";

// Metadata keys of a client's place in line while it waits for a free slot, before the handshake.
export const QUEUE_POSITION = "queue_position"; // 1: the next to start
export const QUEUE_LENGTH = "queue_length"; // clients waiting, this one included

export const SAMPLE_RATE = 24000; // Hz, both directions
export const FRAME_SIZE = 1920; // samples per model step (80 ms)

const utf8Encoder = new TextEncoder();
const utf8Decoder = new TextDecoder("utf-8", { fatal: true });

function withKind(kind, payload) {
  const out = new Uint8Array(1 + payload.length);
  out[0] = kind;
  out.set(payload, 1);
  return out;
}

export function encodeAudio(ogg) { return withKind(KIND_AUDIO, ogg); }
export function encodeControl(code) { return withKind(KIND_CONTROL, Uint8Array.of(code)); }
export function encodePing() { return Uint8Array.of(KIND_PING); }
export function encodeInject(text) { return withKind(KIND_INJECT, utf8Encoder.encode(text)); }
export function encodeMetadata(value) {
  return withKind(KIND_METADATA, utf8Encoder.encode(JSON.stringify(value)));
}

// {position, length} of a place-in-line metadata value, else null.
export function queuePosition(data) {
  if (data === null || typeof data !== "object") return null;
  const position = data[QUEUE_POSITION], length = data[QUEUE_LENGTH];
  return Number.isInteger(position) && Number.isInteger(length) ? { position, length } : null;
}

// Parses one binary message into {kind, data}; throws Error on anything malformed.
// data: Uint8Array for audio/handshake/ping, string for text/error, JSON value for metadata,
// the code for control.
export function parse(buffer) {
  const bytes = new Uint8Array(buffer);
  if (bytes.length === 0) throw new Error("empty message");
  const kind = bytes[0];
  const payload = bytes.subarray(1);
  switch (kind) {
    case KIND_HANDSHAKE:
    case KIND_AUDIO:
    case KIND_PING:
      return { kind, data: payload };
    case KIND_TEXT:
    case KIND_ERROR:
      return { kind, data: utf8Decoder.decode(payload) };
    case KIND_CONTROL:
      if (payload.length !== 1) throw new Error("control message without exactly one byte");
      return { kind, data: payload[0] };
    case KIND_METADATA:
      return { kind, data: JSON.parse(utf8Decoder.decode(payload)) };
    default:
      throw new Error(`unknown message kind ${kind}`);
  }
}
