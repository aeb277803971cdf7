"""The main job: an image and a spoken question in, a text and spoken answer out, with a latency breakdown.

Runs offline. Without a converted real bundle it uses the built-in random-weights bundle: the words are noise,
but every stage (slicing, SigLIP, Whisper, llama.cpp prefill/decode, TTS, vocoder) runs for real and is timed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from edge.constants import AUDIO_SAMPLE_RATE, RANDOM_WEIGHTS_NOTICE
from edge.default_bundle import resolve_bundle
from edge.events import AudioChunk, PromptReady, TextDelta
from edge.io.speaker import write_wav
from edge.omni import Omni
from edge.profiles import start_profile
from edge.sampling import SamplingOptions
from edge.session import ReplyOptions, SpeechOptions

DEMO_QUESTION_SECONDS = 2.0
DEMO_IMAGE_SIZE = (896, 560)  # W, H: sliced into a grid like a phone photo would be
DEMO_MAX_NEW_TOKENS = 48


def demo_image():
    """A drawn scene (sky, sun, house, grass): no file needed, same pixels every run."""
    w, h = DEMO_IMAGE_SIZE
    img = Image.new("RGB", (w, h))
    d = ImageDraw.Draw(img)
    for y in range(h):
        t = y / h
        d.line([(0, y), (w, y)], fill=(int(90 + 100 * t), int(150 + 80 * t), 255 - int(40 * t)))
    d.rectangle([0, int(h * 0.7), w, h], fill=(60, 160, 70))
    d.ellipse([w * 0.75, h * 0.08, w * 0.9, h * 0.32], fill=(255, 220, 60))
    d.rectangle([w * 0.2, h * 0.42, w * 0.45, h * 0.75], fill=(200, 80, 60))
    d.polygon([(w * 0.17, h * 0.42), (w * 0.325, h * 0.22), (w * 0.48, h * 0.42)], fill=(120, 50, 40))
    return img


def demo_question(sr: int = AUDIO_SAMPLE_RATE) -> np.ndarray:
    """A voiced, speech-like 2-s signal (glottal pulse train through vowel formants), standing in for a spoken
    question when no microphone or file is given."""
    n = int(DEMO_QUESTION_SECONDS * sr)
    t = np.arange(n) / sr
    f0 = 120 + 30 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / sr
    src = np.sign(np.sin(phase)) * 0.3
    out = np.zeros(n)
    for formant, bw in ((700, 80), (1200, 90), (2600, 120)):
        r = np.exp(-np.pi * bw / sr)
        a1, a2 = -2 * r * np.cos(2 * np.pi * formant / sr), r * r
        y = np.zeros(n)
        for i in range(2, n):
            y[i] = src[i] - a1 * y[i - 1] - a2 * y[i - 2]
        out += y
    env = np.clip(np.sin(np.pi * t / DEMO_QUESTION_SECONDS) * 3, 0, 1)
    out *= env / (np.abs(out).max() + 1e-9) * 0.5
    return out.astype(np.float32)


@dataclass
class Timings:
    stages: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, seconds: float) -> None:
        self.stages[name] = self.stages.get(name, 0.0) + seconds

    def report(self) -> str:
        return "\n".join(f"  {k:28s} {v * 1000:9.1f} ms" for k, v in self.stages.items())


def run_demo(bundle=None, *, speak: bool = True, output_audio: str | Path = "demo-reply.wav", threads: int = 0,
             profile="auto", overrides=(), image=None, audio=None,
             question: str = "What is in the picture? Answer the spoken question too.") -> dict:
    """`profile`: a device profile name or Profile (see edge.profiles), `overrides`: its `--set` values;
    `threads` (0 = the profile's) sets both llama.cpp and onnxruntime threads."""
    tm = Timings()
    t0 = time.perf_counter()
    b = resolve_bundle(bundle)
    print(f"bundle: {b.root} ({b.source.get('name')})")
    prof, hw = start_profile(b, profile, overrides, threads=threads)
    omni = Omni.load(b, profile=prof, hardware=hw)
    tm.add("load bundle", time.perf_counter() - t0)
    if omni.random_weights:
        print(RANDOM_WEIGHTS_NOTICE)
    img = image if image is not None else demo_image()
    wav = audio if audio is not None else demo_question()
    msgs = [{"role": "user", "content": [img, wav, question]}]

    t = time.perf_counter()
    prompt = omni.build_prompt(msgs, use_tts_template=speak)
    tm.add("preprocess + prompt", time.perf_counter() - t)
    session = omni.new_session()
    t = time.perf_counter()
    embeds = session.encode(prompt)
    tm.add("encode image + audio (ONNX)", time.perf_counter() - t)
    options = ReplyOptions(SamplingOptions(seed=0), max_new_tokens=DEMO_MAX_NEW_TOKENS,
                           speech=SpeechOptions(mode="whole") if speak else None)
    t = time.perf_counter()
    wave, finished, prefill_end = [], None, None
    for ev in session.reply(options, prompt=prompt, embeds=embeds, replace=True):
        if isinstance(ev, PromptReady):
            prefill_end = time.perf_counter()
            tm.add(f"LLM prefill ({ev.prompt_tokens} tokens)", prefill_end - t)
            print("assistant: ", end="", flush=True)
        elif isinstance(ev, TextDelta) and ev.text:
            print(ev.text, end="", flush=True)
        elif isinstance(ev, AudioChunk):
            wave.append(ev.pcm)
        else:
            finished = ev
    print()
    timing, n_tok = finished.timing, finished.completion_tokens
    start = prefill_end - t
    decode_end = timing.decode_end if timing.decode_end is not None else start
    dt = decode_end - start
    tm.add("LLM first token", (timing.first_token - start) if timing.first_token is not None else 0.0)
    tm.add(f"LLM decode ({n_tok} tokens, {n_tok / max(dt, 1e-9):.1f} tok/s)", dt)
    result = {"text": finished.text, "tokens": n_tok, "timings": tm.stages, "random_weights": omni.random_weights,
              "profile": prof}
    if speak:
        speech = np.concatenate(wave) if wave else np.zeros(0, np.float32)
        sr = omni.tts.sample_rate
        el, secs = timing.total - decode_end, len(speech) / sr
        tm.add(f"TTS ({secs:.2f} s audio, RTF {el / max(secs, 1e-9):.2f})", el)
        write_wav(output_audio, speech, sr)
        print(f"speech: {output_audio} ({secs:.2f} s, {sr} Hz)")
        result["audio_path"] = str(output_audio)
    print("latency breakdown:\n" + tm.report())
    omni.close()
    return result
