// Audio for the demo page: microphone capture (16 kHz frames), an energy VAD that cuts turns and detects
// barge-in, a gapless 24 kHz player, and PCM/WAV/base64 helpers. No DOM here.

export const IN_RATE = 16000; // the model's input rate (Whisper), realtime schema: input.audio is 16 kHz pcm16
export const FRAME_SAMPLES = 320; // 20-ms VAD frames at 16 kHz
const FRAME_MS = (FRAME_SAMPLES / IN_RATE) * 1000;
// Low-pass before resampling to 16 kHz: below the 8-kHz Nyquist limit with room for the filter's slope.
const ANTI_ALIAS_HZ = 7000;

// --- VAD / turn taking ------------------------------------------------------------------------------------------
// Energy thresholds in dBFS. Speech must clear both the absolute floor and the tracked noise floor by a margin.
export const VAD = {
  minSpeechDb: -45, // quieter than this is never speech (a quiet room with AGC sits around -60..-50)
  marginDb: 12, // above the tracked noise floor
  bargeInExtraDb: 6, // while the assistant talks: echo residue after echo cancellation must not count
  startMs: 100, // speech this long starts a turn (a click or a cough is shorter)
  bargeInMs: 200, // ... and this long interrupts the assistant
  endSilenceMs: 700, // silence this long ends the turn (pauses inside a sentence are shorter)
  prerollMs: 300, // audio kept from before the start, so the first syllable is not cut
  floorRiseDbPerFrame: 0.05, // the noise floor follows rising noise slowly (2.5 dB/s) and falling noise at once
  maxTurnSeconds: 15, // a live turn is committed after this long: 15 s with a frame per second is ~1.3k tokens
};

export function levelDb(frame) {
  let e = 0;
  for (let i = 0; i < frame.length; i++) e += frame[i] * frame[i];
  return 10 * Math.log10(e / frame.length + 1e-12);
}

// Pure turn detector: feed one frame's level and whether the assistant is busy; get "start" / "end" / null.
export class TurnDetector {
  constructor(opts = VAD) {
    this.o = opts;
    this.floor = -60;
    this.inTurn = false;
    this.run = 0; // consecutive speech frames (outside a turn) or silence frames (inside)
    this.turnFrames = 0;
  }

  feed(db, assistantBusy) {
    const o = this.o;
    this.floor = db < this.floor ? db : this.floor + o.floorRiseDbPerFrame;
    const extra = assistantBusy ? o.bargeInExtraDb : 0;
    const speech = db > Math.max(o.minSpeechDb, this.floor + o.marginDb) + extra;
    if (!this.inTurn) {
      this.run = speech ? this.run + 1 : 0;
      const need = (assistantBusy ? o.bargeInMs : o.startMs) / FRAME_MS;
      if (this.run >= need) {
        this.inTurn = true;
        this.run = 0;
        this.turnFrames = 0;
        return "start";
      }
      return null;
    }
    this.turnFrames++;
    this.run = speech ? 0 : this.run + 1;
    if (this.run >= o.endSilenceMs / FRAME_MS || this.turnFrames * FRAME_MS >= o.maxTurnSeconds * 1000) {
      this.inTurn = false;
      this.run = 0;
      return "end";
    }
    return null;
  }

  reset() {
    this.inTurn = false;
    this.run = 0;
  }
}

// --- microphone -------------------------------------------------------------------------------------------------
// Calls onFrame(Float32Array of FRAME_SAMPLES at 16 kHz) on the main thread.
export async function startCapture(ctx, stream, onFrame) {
  await ctx.audioWorklet.addModule("/web/capture-worklet.js");
  const src = ctx.createMediaStreamSource(stream);
  const lp = ctx.createBiquadFilter();
  lp.type = "lowpass";
  lp.frequency.value = Math.min(ANTI_ALIAS_HZ, ctx.sampleRate / 2 - 1);
  const node = new AudioWorkletNode(ctx, "edge-capture", {
    numberOfInputs: 1, numberOfOutputs: 1, channelCount: 1, channelCountMode: "explicit",
    processorOptions: {targetRate: IN_RATE, frameSamples: FRAME_SAMPLES},
  });
  node.port.onmessage = (e) => onFrame(e.data);
  // A silent sink keeps the worklet pulled by the graph (a node that reaches no destination may not run).
  const mute = ctx.createGain();
  mute.gain.value = 0;
  src.connect(lp).connect(node).connect(mute).connect(ctx.destination);
  return () => {
    src.disconnect();
    node.port.onmessage = null;
    node.disconnect();
  };
}

// --- playback ---------------------------------------------------------------------------------------------------
const PLAY_LEAD_S = 0.05; // first chunk of a reply starts this far ahead (absorbs main-thread jitter)
const SCHEDULE_LOG = 1000; // scheduled chunks kept in stats.schedule (for the tests and the console)
const MIN_MARGIN_S = 0.005; // closer to its end than this, the previous chunk is treated as already over

// Schedules pcm16 chunks back to back on the context's clock: chunk k+1 starts exactly where chunk k ends, unless
// it arrived too late (an underrun: the gap is counted).
export class Player {
  constructor(ctx, rate, stats) {
    this.ctx = ctx;
    this.rate = rate;
    this.stats = stats;
    this.sources = new Set();
    this.endTime = 0; // context time where the scheduled speech ends
    this.reply = null; // reply of the last scheduled chunk
    this.onIdle = null;
  }

  get playing() {
    return this.sources.size > 0;
  }

  enqueue(pcm, replyId) {
    const n = pcm.length;
    if (!n) return;
    const buf = this.ctx.createBuffer(1, n, this.rate);
    const ch = buf.getChannelData(0);
    for (let i = 0; i < n; i++) ch[i] = pcm[i] / 32768;
    const src = this.ctx.createBufferSource();
    src.buffer = buf;
    src.connect(this.ctx.destination);
    const now = this.ctx.currentTime;
    let start = this.endTime; // back to back with what is scheduled (this reply's chunks, or a reply before it)
    if (start < now + MIN_MARGIN_S) {
      if (replyId === this.reply) this.stats.underruns++; // this reply's speech ran dry: an audible gap
      start = now + PLAY_LEAD_S;
    }
    this.reply = replyId;
    src.start(start);
    this.endTime = start + buf.duration;
    this.sources.add(src);
    this.stats.audioChunksScheduled++;
    this.stats.audioSecondsScheduled += buf.duration;
    this.stats.schedule.push({reply: replyId, start, duration: buf.duration});
    if (this.stats.schedule.length > SCHEDULE_LOG) this.stats.schedule.shift();
    src.onended = () => {
      if (!this.sources.delete(src)) return;
      this.stats.audioChunksEnded++;
      if (this.sources.size === 0 && this.onIdle) this.onIdle();
    };
  }

  // Barge-in: drop everything scheduled. Returns the seconds of speech that will not be heard.
  stop() {
    const dropped = Math.max(0, this.endTime - this.ctx.currentTime);
    for (const src of this.sources) {
      src.onended = null;
      try {
        src.stop();
      } catch (e) {
        /* already stopped */
      }
      this.stats.sourcesStopped++;
    }
    this.sources.clear();
    this.endTime = 0;
    this.reply = null;
    if (this.onIdle) this.onIdle();
    return dropped;
  }
}

// --- encoding helpers -------------------------------------------------------------------------------------------
export function floatToPcm16(samples) {
  const out = new Int16Array(samples.length);
  for (let i = 0; i < samples.length; i++) {
    const v = Math.max(-1, Math.min(1, samples[i]));
    out[i] = Math.round(v * 32767);
  }
  return out;
}

export function bytesToBase64(bytes) {
  let s = "";
  const CHUNK = 0x8000; // String.fromCharCode takes its arguments on the stack: keep calls small
  for (let i = 0; i < bytes.length; i += CHUNK) s += String.fromCharCode.apply(null, bytes.subarray(i, i + CHUNK));
  return btoa(s);
}

export function pcm16ToBase64(pcm) {
  const bytes = new Uint8Array(pcm.length * 2);
  const v = new DataView(bytes.buffer);
  for (let i = 0; i < pcm.length; i++) v.setInt16(i * 2, pcm[i], true);
  return bytesToBase64(bytes);
}

export function base64ToPcm16(b64) {
  const s = atob(b64);
  const out = new Int16Array(s.length >> 1);
  for (let i = 0; i < out.length; i++) {
    const lo = s.charCodeAt(2 * i);
    const hi = s.charCodeAt(2 * i + 1);
    out[i] = ((hi << 8) | lo) << 16 >> 16; // little-endian, sign-extended
  }
  return out;
}

export function wavBytes(pcm, rate) {
  const data = pcm.length * 2;
  const buf = new ArrayBuffer(44 + data);
  const v = new DataView(buf);
  const str = (o, s) => [...s].forEach((c, i) => v.setUint8(o + i, c.charCodeAt(0)));
  str(0, "RIFF");
  v.setUint32(4, 36 + data, true);
  str(8, "WAVE");
  str(12, "fmt ");
  v.setUint32(16, 16, true);
  v.setUint16(20, 1, true); // PCM
  v.setUint16(22, 1, true); // mono
  v.setUint32(24, rate, true);
  v.setUint32(28, rate * 2, true);
  v.setUint16(32, 2, true);
  v.setUint16(34, 16, true);
  str(36, "data");
  v.setUint32(40, data, true);
  for (let i = 0; i < pcm.length; i++) v.setInt16(44 + i * 2, pcm[i], true);
  return new Uint8Array(buf);
}

// Any audio file the browser can decode -> a 16 kHz mono WAV data URL (at most maxSeconds), for voice cloning.
export async function clipToWavDataUrl(file, maxSeconds) {
  const raw = await file.arrayBuffer();
  const probe = new OfflineAudioContext(1, 1, IN_RATE);
  const decoded = await probe.decodeAudioData(raw);
  const seconds = Math.min(decoded.duration, maxSeconds);
  const n = Math.max(1, Math.round(seconds * IN_RATE));
  const off = new OfflineAudioContext(1, n, IN_RATE); // renders the downmix and the resampling
  const src = off.createBufferSource();
  src.buffer = decoded;
  src.connect(off.destination);
  src.start();
  const rendered = await off.startRendering();
  const pcm = floatToPcm16(rendered.getChannelData(0));
  return {url: "data:audio/wav;base64," + bytesToBase64(wavBytes(pcm, IN_RATE)), seconds};
}
