// Microphone capture on the audio thread: resample the context's rate (44.1/48 kHz) to the model's 16 kHz by
// linear interpolation (a BiquadFilter low-pass in front removes what would alias) and post 20-ms frames of
// float32 samples to the page. Runs in AudioWorkletGlobalScope: `sampleRate` is the context's rate.

class EdgeCapture extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const o = options.processorOptions || {};
    this.outRate = o.targetRate || 16000;
    this.frame = new Float32Array(o.frameSamples || 320);
    this.fill = 0;
    this.step = sampleRate / this.outRate; // input samples per output sample
    this.prev = 0; // last input sample of the previous block
    this.t = 0; // position of the next output sample, in input samples after `prev`
  }

  process(inputs) {
    const ch = inputs[0] && inputs[0][0];
    if (!ch) return true;
    // The sequence is [prev, ch[0], ..., ch[n-1]]: index i of it is ch[i-1].
    const n = ch.length;
    let t = this.t;
    while (t < n) {
      const i = Math.floor(t);
      const f = t - i;
      const a = i === 0 ? this.prev : ch[i - 1];
      const b = ch[i];
      this.frame[this.fill++] = a + (b - a) * f;
      if (this.fill === this.frame.length) {
        this.port.postMessage(this.frame.slice(0));
        this.fill = 0;
      }
      t += this.step;
    }
    this.t = t - n;
    this.prev = ch[n - 1];
    return true;
  }
}

registerProcessor("edge-capture", EdgeCapture);
