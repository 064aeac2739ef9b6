// The latency the page hears, as openmoshi/serving/latency.py measures it (read the why there): for
// each chunk of decoded audio, its arrival time minus the time the page had handed the websocket the
// input the model needed for it (the input up to the same sample, plus one 80 ms frame). Live, over
// the last `windowMs`; memory stays bounded however long the conversation.

export class LatencyMeter {
  constructor(frameSize = 1920, windowMs = 10000) {
    this.frameSize = frameSize;
    this.windowMs = windowMs;
    this.sentSamples = []; // cumulative input samples, increasing; those no chunk will need are gone
    this.lastSent = 0;
    this.sentTimes = [];
    this.pending = []; // [needed input samples, arrival ms] of chunks whose input is not sent yet
    this.recent = []; // [arrival ms, latency ms], oldest first
  }

  // The page has sent `total` input samples in all, as of `atMs`.
  sent(total, atMs) {
    if (total <= this.lastSent) return;
    this.lastSent = total;
    this.sentSamples.push(total);
    this.sentTimes.push(atMs);
    while (this.pending.length && this.pending[0][0] <= total) {
      const [, at] = this.pending.shift();
      this.add(at, at - atMs); // counted as the Python meter counts it: negative, a server ahead of causality
    }
  }

  // `total` output samples have arrived in all, as of `atMs`: this chunk's latency in ms, or null
  // while the input it needed is not sent yet.
  received(total, atMs) {
    const needed = total + this.frameSize;
    // Outputs only grow: a sent count below what this chunk needs is never looked up again.
    let i = 0;
    while (i < this.sentSamples.length && this.sentSamples[i] < needed) i++;
    this.sentSamples.splice(0, i);
    this.sentTimes.splice(0, i);
    if (this.sentSamples.length && this.sentSamples[0] >= needed) {
      const latency = atMs - this.sentTimes[0];
      this.add(atMs, latency);
      return latency;
    }
    this.pending.push([needed, atMs]);
    return null;
  }

  add(atMs, latencyMs) {
    this.recent.push([atMs, latencyMs]);
    while (this.recent.length && this.recent[0][0] < atMs - this.windowMs) this.recent.shift();
  }

  // {chunks, p50, p90} in ms over the chunks that arrived in the last windowMs before nowMs.
  summary(nowMs) {
    const values = this.recent.filter(([at]) => at >= nowMs - this.windowMs).map(([, ms]) => ms);
    return { chunks: values.length, p50: percentile(values, 50), p90: percentile(values, 90) };
  }
}

// numpy's default (linear) percentile; null for no values.
export function percentile(values, q) {
  if (values.length === 0) return null;
  const v = [...values].sort((a, b) => a - b);
  const pos = (v.length - 1) * q / 100, lo = Math.floor(pos), hi = Math.ceil(pos);
  return v[lo] + (v[hi] - v[lo]) * (pos - lo);
}
