// The speaker's jitter buffer: hold back only as much of the server's voice as the network's jitter
// needs. The same policy as openmoshi/serving/jitter.py, line for line (tests/test_jitter.py runs both
// on the same pushes and pulls and compares); read the policy there. In short:
//  - hold: at the start and after an underrun, new audio waits `target` before it plays;
//  - adapt: each underrun raises `target` by 20 ms (up to the cap less one frame), every 5 s
//    without one lowers it by 10 ms (down to `least`, where it starts);
//  - trim: every 2 s, a queue that never fell below `target` + 10 ms while playing loses the
//    surplus (2.5 ms crossfade), so a lower target means a lower latency;
//  - cap: more than `most` queued drops the oldest down to `target` plus one frame.
// Times are samples of the speaker's clock (`clock`: samples pulled so far).

export const FRAME_SIZE = 1920; // one 80 ms model step: the size of the server's bursts
const STEP_UP_S = 0.020, STEP_DOWN_S = 0.010, QUIET_S = 5.0;
const TRIM_EVERY_S = 2.0, TRIM_MIN_S = 0.010, FADE_S = 0.0025;

export class JitterBuffer {
  // leastS: the least (and first) hold; mostS: the most queued before the oldest is dropped.
  constructor(leastS = 0.02, mostS = 0.32, rate = 24000) {
    const samples = (s) => Math.round(s * rate);
    this.rate = rate;
    this.least = Math.max(0, samples(leastS));
    this.most = Math.max(samples(mostS), this.least + FRAME_SIZE);
    this.ceiling = this.most - FRAME_SIZE; // a target above it would be dropped by the cap
    this.target = this.least;
    this.stepUp = samples(STEP_UP_S); this.stepDown = samples(STEP_DOWN_S); this.quiet = samples(QUIET_S);
    this.trimEvery = samples(TRIM_EVERY_S); this.trimMin = samples(TRIM_MIN_S); this.fade = samples(FADE_S);
    this.ring = new Float32Array(2 * this.most); // grows if ever too small
    this.head = 0; // ring index of the oldest queued sample
    this.queued = 0;
    this.clock = 0; // samples pulled so far
    this.pushed = 0; // stream index after the newest sample
    this.playing = false;
    this.heldSince = null; // clock when audio came while not playing
    this.lastChange = 0; // clock of the last underrun or target decrease
    this.windowStart = 0;
    this.low = null; // least queued in this trim window while playing
    this.marks = []; // [index of a chunk's last sample, tag, arrival clock], oldest first
    this.started = []; // [tag, samples its last sample waited], for the latency as heard
    this.played = 0; this.dropped = 0; this.underruns = 0;
  }

  push(pcm, tag = null) {
    if (pcm.length === 0) return;
    this.pushed += pcm.length;
    if (tag !== null && tag !== undefined) this.marks.push([this.pushed - 1, tag, this.clock]);
    if (this.queued + pcm.length > this.ring.length) this.grow(this.queued + pcm.length);
    for (let i = 0; i < pcm.length; i++) this.ring[(this.head + this.queued + i) % this.ring.length] = pcm[i];
    this.queued += pcm.length;
    if (!this.playing && this.heldSince === null) this.heldSince = this.clock;
    if (this.queued > this.most) this.drop(this.queued - (this.target + FRAME_SIZE));
  }

  // Fills `out` (a Float32Array) with the next samples for the speaker, silence where there is none.
  pull(out) {
    const n = out.length;
    out.fill(0);
    let begin = 0; // where in this block the audio starts
    if (!this.playing && this.heldSince !== null && this.clock + n > this.heldSince + this.target) {
      begin = Math.max(0, this.heldSince + this.target - this.clock);
      this.playing = true; this.heldSince = null;
    }
    if (this.playing) {
      const k = Math.min(n - begin, this.queued);
      for (let i = 0; i < k; i++) out[begin + i] = this.at(i);
      this.markPlayed(k, this.clock + begin);
      this.head = (this.head + k) % this.ring.length;
      this.queued -= k;
      this.played += k;
      if (k < n - begin) { // ran dry: the burst came later than target
        this.playing = false;
        this.underruns++;
        this.target = Math.min(this.ceiling, this.target + this.stepUp);
        this.lastChange = this.clock;
        this.low = 0; // no trimming in a window that had an underrun
      } else {
        this.low = this.low === null ? this.queued : Math.min(this.low, this.queued);
      }
    }
    this.clock += n;
    this.adapt();
  }

  adapt() {
    if (this.clock - this.lastChange >= this.quiet) {
      this.target = Math.max(this.least, this.target - this.stepDown);
      this.lastChange = this.clock;
    }
    if (this.clock - this.windowStart >= this.trimEvery) {
      const surplus = this.low === null ? 0 : this.low - this.target;
      if (this.playing && this.low !== null && surplus >= this.trimMin) this.drop(surplus);
      this.windowStart = this.clock; this.low = null;
    }
  }

  at(i) { return this.ring[(this.head + i) % this.ring.length]; }

  markPlayed(k, playsAt) {
    const head = this.pushed - this.queued;
    while (this.marks.length && this.marks[0][0] < head + k) {
      const [index, tag, arrival] = this.marks.shift();
      this.started.push([tag, playsAt + index - head - arrival]);
    }
  }

  // Drops the oldest n samples; while playing, the next samples fade from the dropped into the kept.
  drop(n) {
    n = Math.min(Math.max(0, n), this.queued);
    if (n === 0) return;
    const fade = this.playing && this.queued >= n + this.fade ? this.fade : 0;
    const mixed = new Float32Array(fade);
    for (let i = 0; i < fade; i++) {
      const w = Math.fround((i + 1) / (fade + 1)); // float32, as numpy computes it
      mixed[i] = this.at(i) * (1 - w) + this.at(n + i) * w;
    }
    this.head = (this.head + n) % this.ring.length;
    this.queued -= n;
    for (let i = 0; i < fade; i++) this.ring[(this.head + i) % this.ring.length] = mixed[i];
    this.dropped += n;
    const head = this.pushed - this.queued;
    while (this.marks.length && this.marks[0][0] < head) this.marks.shift(); // never to play
  }

  grow(size) {
    const ring = new Float32Array(2 * size);
    for (let i = 0; i < this.queued; i++) ring[i] = this.at(i);
    this.ring = ring; this.head = 0;
  }

  takeStarted() { const out = this.started; this.started = []; return out; }
}
