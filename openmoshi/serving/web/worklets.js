// AudioWorklet processors, both running in the page's 24 kHz AudioContext.
//  - "capture" hands the microphone to the page in 20 ms chunks.
//  - "playback" plays the model's audio through an adaptive jitter buffer (jitter.js): it holds
//    back at least `startMs` and only as much more as underruns ask for, and drops the oldest audio
//    beyond `maxMs` (the network or the model ran ahead of the speaker), so lag never accumulates.
//    It reports, for each chunk it plays, the latency as heard: the chunk's latency on arrival
//    (measured by the page, latency.js) plus how long it waited here.
// Both stamp their chunks with `currentFrame`, the context's clock, so the page can line the two
// voices up when recording.

import { JitterBuffer } from "./jitter.js";

class CaptureProcessor extends AudioWorkletProcessor {
  constructor() {
    super();
    this.chunk = new Float32Array(sampleRate / 50);
    this.filled = 0;
    this.chunkStart = 0;
  }

  process(inputs) {
    const channel = inputs[0] && inputs[0][0];
    if (!channel) return true;
    for (let i = 0; i < channel.length; i++) {
      if (this.filled === 0) this.chunkStart = currentFrame + i;
      this.chunk[this.filled++] = channel[i];
      if (this.filled === this.chunk.length) {
        this.port.postMessage({ frame: this.chunkStart, samples: this.chunk });
        this.chunk = new Float32Array(this.chunk.length);
        this.filled = 0;
      }
    }
    return true;
  }
}

class PlaybackProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const opts = options.processorOptions || {};
    this.least = (opts.startMs ?? 20) / 1000;
    this.most = (opts.maxMs ?? 320) / 1000;
    this.jitter = new JitterBuffer(this.least, this.most, sampleRate);
    this.lastReport = 0;
    this.heard = []; // ms, one per chunk that played since the last report
    this.port.onmessage = (e) => {
      if (e.data === "reset") { this.jitter = new JitterBuffer(this.least, this.most, sampleRate); return; }
      this.jitter.push(e.data.pcm, e.data.latencyMs ?? null);
    };
  }

  process(_inputs, outputs) {
    const out = outputs[0][0];
    const j = this.jitter;
    const before = j.played;
    j.pull(out);
    for (let c = 1; c < outputs[0].length; c++) outputs[0][c].set(out);
    if (j.played > before) this.port.postMessage({ frame: currentFrame, samples: out.slice() });
    // Heard: the chunk's latency on arrival plus how long its last sample waited here.
    for (const [latencyMs, waited] of j.takeStarted()) this.heard.push(latencyMs + 1000 * waited / sampleRate);
    if (currentFrame - this.lastReport >= sampleRate / 4) {
      this.lastReport = currentFrame;
      this.port.postMessage({ stats: {
        played: j.played, dropped: j.dropped, underruns: j.underruns, heardMs: this.heard,
        bufferedMs: 1000 * j.queued / sampleRate, targetMs: 1000 * j.target / sampleRate,
      } });
      this.heard = [];
    }
    return true;
  }
}

registerProcessor("capture", CaptureProcessor);
registerProcessor("playback", PlaybackProcessor);
