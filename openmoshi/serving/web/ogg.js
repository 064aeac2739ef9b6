// A small Ogg muxer and demuxer for one Opus stream (RFC 3533 pages, RFC 7845 Opus mapping).
// The browser's WebCodecs encoder and decoder handle raw Opus packets; the wire carries Ogg pages.

// Ogg's CRC-32: polynomial 0x04c11db7, not reflected, initial value 0, no final xor.
const CRC_TABLE = (() => {
  const table = new Uint32Array(256);
  for (let i = 0; i < 256; i++) {
    let r = i << 24;
    for (let j = 0; j < 8; j++) r = (r & 0x80000000) ? ((r << 1) ^ 0x04c11db7) : (r << 1);
    table[i] = r >>> 0;
  }
  return table;
})();

export function oggCrc(bytes) {
  let crc = 0;
  for (let i = 0; i < bytes.length; i++) {
    crc = ((crc << 8) ^ CRC_TABLE[((crc >>> 24) ^ bytes[i]) & 0xff]) >>> 0;
  }
  return crc;
}

const HEADER_SIZE = 27;
const FLAG_CONTINUED = 0x01;
const FLAG_BOS = 0x02;
const OPUS_GRANULE_RATE = 48000; // Ogg Opus granule positions always count 48 kHz samples

function ascii(text) { return Uint8Array.from(text, (c) => c.charCodeAt(0)); }
function startsWith(bytes, text) {
  if (bytes.length < text.length) return false;
  for (let i = 0; i < text.length; i++) if (bytes[i] !== text.charCodeAt(i)) return false;
  return true;
}

// One page holding whole packets (each under 255 * 255 bytes, far more than an Opus packet).
function makePage(packets, flags, granule, serial, sequence) {
  const lacing = [];
  for (const p of packets) {
    let n = p.length;
    while (n >= 255) { lacing.push(255); n -= 255; }
    lacing.push(n);
  }
  if (lacing.length > 255) throw new Error("too many packets for one Ogg page");
  const bodySize = packets.reduce((s, p) => s + p.length, 0);
  const page = new Uint8Array(HEADER_SIZE + lacing.length + bodySize);
  const view = new DataView(page.buffer);
  page.set(ascii("OggS"), 0);
  page[4] = 0; // stream structure version
  page[5] = flags;
  view.setBigInt64(6, BigInt(granule), true);
  view.setUint32(14, serial, true);
  view.setUint32(18, sequence, true);
  // bytes 22..25: CRC, computed with the field zeroed
  page[26] = lacing.length;
  page.set(lacing, HEADER_SIZE);
  let offset = HEADER_SIZE + lacing.length;
  for (const p of packets) { page.set(p, offset); offset += p.length; }
  view.setUint32(22, oggCrc(page), true);
  return page;
}

export function opusHead(channels, inputSampleRate, preSkip = 0) {
  const head = new Uint8Array(19);
  const view = new DataView(head.buffer);
  head.set(ascii("OpusHead"), 0);
  head[8] = 1; // version
  head[9] = channels;
  view.setUint16(10, preSkip, true);
  view.setUint32(12, inputSampleRate, true);
  view.setInt16(16, 0, true); // output gain
  head[18] = 0; // channel mapping family 0: mono or stereo
  return head;
}

function opusTags(vendor) {
  const v = ascii(vendor);
  const tags = new Uint8Array(8 + 4 + v.length + 4);
  const view = new DataView(tags.buffer);
  tags.set(ascii("OpusTags"), 0);
  view.setUint32(8, v.length, true);
  tags.set(v, 12);
  view.setUint32(12 + v.length, 0, true); // no user comments
  return tags;
}

// Writes an Ogg Opus stream: `headers()` once, then one page per packet (lowest latency).
export class OggOpusWriter {
  constructor({ channels = 1, inputSampleRate = 24000, preSkip = 0, serial } = {}) {
    this.channels = channels;
    this.inputSampleRate = inputSampleRate;
    this.preSkip = preSkip;
    this.serial = serial ?? ((Math.random() * 0xffffffff) >>> 0);
    this.sequence = 0;
    this.granule = 0;
  }

  headers() {
    const head = makePage([opusHead(this.channels, this.inputSampleRate, this.preSkip)],
      FLAG_BOS, 0, this.serial, this.sequence++);
    const tags = makePage([opusTags("openmoshi")], 0, 0, this.serial, this.sequence++);
    return concat([head, tags]);
  }

  // `durationUs`: the packet's duration in microseconds (from the encoder's chunk).
  packet(data, durationUs) {
    this.granule += Math.round(durationUs * OPUS_GRANULE_RATE / 1e6);
    return makePage([data], 0, this.granule, this.serial, this.sequence++);
  }
}

// Reads Ogg pages fed in arbitrary pieces; returns the Opus audio packets, skipping the
// OpusHead and OpusTags header packets (the head is kept in `this.head`).
export class OggOpusReader {
  constructor() {
    this.buffer = new Uint8Array(0);
    this.partial = []; // pieces of a packet continued on the next page
    this.head = null;
    this.headerPackets = 0;
    this.badPages = 0;
  }

  append(bytes) {
    this.buffer = concat([this.buffer, new Uint8Array(bytes)]);
    const packets = [];
    let pos = 0;
    while (this.buffer.length - pos >= HEADER_SIZE) {
      const b = this.buffer;
      if (!startsWith(b.subarray(pos), "OggS")) {
        // Lost sync: skip to the next capture pattern.
        const next = indexOfOggS(b, pos + 1);
        this.badPages++;
        pos = next < 0 ? b.length - 3 : next;
        continue;
      }
      const nSegments = b[pos + 26];
      if (b.length - pos < HEADER_SIZE + nSegments) break;
      const lacing = b.subarray(pos + HEADER_SIZE, pos + HEADER_SIZE + nSegments);
      const bodySize = lacing.reduce((s, x) => s + x, 0);
      const pageSize = HEADER_SIZE + nSegments + bodySize;
      if (b.length - pos < pageSize) break;
      const page = b.slice(pos, pos + pageSize);
      pos += pageSize;
      const stored = new DataView(page.buffer).getUint32(22, true);
      page.fill(0, 22, 26);
      if (oggCrc(page) !== stored) { this.badPages++; this.partial = []; continue; }
      if (!(page[5] & FLAG_CONTINUED)) this.partial = [];
      let offset = HEADER_SIZE + nSegments;
      for (const size of lacing) {
        this.partial.push(page.subarray(offset, offset + size));
        offset += size;
        if (size < 255) { // a lacing value under 255 ends the packet
          const packet = concat(this.partial);
          this.partial = [];
          if (this.headerPackets < 2 && (startsWith(packet, "OpusHead") || startsWith(packet, "OpusTags"))) {
            if (startsWith(packet, "OpusHead")) this.head = packet;
            this.headerPackets++;
          } else {
            packets.push(packet);
          }
        }
      }
    }
    this.buffer = this.buffer.slice(pos);
    return packets;
  }
}

function indexOfOggS(b, from) {
  for (let i = from; i + 3 < b.length; i++) {
    if (b[i] === 0x4f && b[i + 1] === 0x67 && b[i + 2] === 0x67 && b[i + 3] === 0x53) return i;
  }
  return -1;
}

export function concat(arrays) {
  const size = arrays.reduce((s, a) => s + a.length, 0);
  const out = new Uint8Array(size);
  let offset = 0;
  for (const a of arrays) { out.set(a, offset); offset += a.length; }
  return out;
}

// Duration in 48 kHz samples of one Opus packet, from its TOC byte (RFC 6716, section 3.1).
export function opusPacketSamples48k(packet) {
  if (packet.length < 1) return 0;
  const toc = packet[0];
  const config = toc >> 3;
  let frame;
  if (config < 12) frame = [480, 960, 1920, 2880][config & 3]; // SILK
  else if (config < 16) frame = [480, 960][config & 1]; // hybrid
  else frame = [120, 240, 480, 960][config & 3]; // CELT
  const code = toc & 3;
  let frames = 1;
  if (code === 1 || code === 2) frames = 2;
  else if (code === 3) frames = packet.length > 1 ? (packet[1] & 0x3f) : 0;
  return frame * frames;
}
