// AudioWorklet processors, both running in the page's 24 kHz AudioContext.
//  - "capture" hands the microphone to the page in 20 ms chunks.
//  - "playback" plays the model's audio through a small jitter buffer: it waits for `startMs`
//    of audio before playing, and when more than `maxMs` is queued (the network or the model ran
//    ahead of the speaker) it drops the oldest audio down to `startMs`, so lag never accumulates.
// Both stamp their chunks with `currentFrame`, the context's clock, so the page can line the two
// voices up when recording.

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
    this.startSamples = Math.round((opts.startMs ?? 80) * sampleRate / 1000);
    this.maxSamples = Math.round((opts.maxMs ?? 320) * sampleRate / 1000);
    this.queue = []; // Float32Arrays, oldest first
    this.offset = 0; // samples already played from queue[0]
    this.queued = 0; // samples in the queue, minus offset
    this.playing = false;
    this.stats = { played: 0, dropped: 0, underruns: 0 };
    this.lastReport = 0;
    this.port.onmessage = (e) => {
      if (e.data === "reset") { this.queue = []; this.offset = 0; this.queued = 0; this.playing = false; return; }
      this.queue.push(e.data);
      this.queued += e.data.length;
      if (this.queued > this.maxSamples) this.drop(this.queued - this.startSamples);
    };
  }

  drop(n) {
    this.stats.dropped += n;
    this.queued -= n;
    while (n > 0) {
      const left = this.queue[0].length - this.offset;
      if (n < left) { this.offset += n; return; }
      n -= left;
      this.queue.shift();
      this.offset = 0;
    }
  }

  process(_inputs, outputs) {
    const out = outputs[0][0];
    let written = 0;
    if (!this.playing && this.queued >= this.startSamples) this.playing = true;
    if (this.playing) {
      while (written < out.length && this.queue.length > 0) {
        const head = this.queue[0];
        const n = Math.min(out.length - written, head.length - this.offset);
        out.set(head.subarray(this.offset, this.offset + n), written);
        written += n;
        this.offset += n;
        this.queued -= n;
        if (this.offset === head.length) { this.queue.shift(); this.offset = 0; }
      }
      if (written < out.length) { this.playing = false; this.stats.underruns++; }
    }
    out.fill(0, written);
    for (let c = 1; c < outputs[0].length; c++) outputs[0][c].set(out);
    this.stats.played += written;
    if (written > 0) this.port.postMessage({ frame: currentFrame, samples: out.slice(0, written) });
    if (currentFrame - this.lastReport >= sampleRate / 4) {
      this.lastReport = currentFrame;
      this.port.postMessage({ stats: { ...this.stats, bufferedMs: 1000 * this.queued / sampleRate } });
    }
    return true;
  }
}

registerProcessor("capture", CaptureProcessor);
registerProcessor("playback", PlaybackProcessor);
