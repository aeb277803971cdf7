"""End-to-end live latency: a scripted 3-turn spoken conversation with video frames through the orchestrator,
with LLM decode and TTS overlapped vs in sequence (`--no-overlap` path), on a bundle given by path.

Per turn: time from end of user speech (VAD decision) to generation-prompt prefill done, first token and first
audio chunk; decode tok/s while the TTS runs; and the issue's target ratio
first_audio / (first_token + one TTS chunk), where one TTS chunk (10 text tokens prefilled + 25 code frames
generated + DVAE/Vocos decode) is timed separately on the same bundle. The microphone is an audio file played in
real time, the camera a video file, the speaker a real-time paced WAV sink; barge-in is off so every reply is
complete. Writes JSON (+ a PNG timeline if matplotlib is installed) to bench/results/.

Random weights sample ids that mostly decode to no text with the synthetic tokenizer (652 real ids in a 151700-row
vocabulary), so the TTS would get nothing to say until the reply ends. The bench therefore replaces each sampled id
by the next id of a fixed English reply (`REPLY`): every token still costs one full decode step, and the TTS gets
the text a real reply would give it.

    python -m bench.e2e --bundle PATH [--max-new-tokens 48] [--threads LLM,ORT] [--variant int8|fp32]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import RESULTS, machine, versions

SR = 16000
MAX_CODES = 200  # TTS code frames per reply (~4.3 s of speech)
TURN_GAP_S = 45.0  # silence after each utterance: a 2-core box lags ~15 s behind while listening, then replies ~19 s
REPLY = ("Sure. I can see a yellow ball that moves from the left to the right over a grey background, and I hear "
         "your question clearly. It is a simple scene, but it is a good test for a small computer.")


class _ScriptedSampler:
    """Stands in for edge.sampling.Sampler: ignores the logits and returns the next id of the scripted reply."""

    def __init__(self, ids: list[int]):
        self.ids, self.i = ids, 0

    def __call__(self, logits, context_ids=None) -> int:
        tok = self.ids[self.i % len(self.ids)]
        self.i += 1
        return tok


def _script() -> np.ndarray:
    from edge.demo import demo_question

    q = demo_question()
    parts = [np.zeros(int(0.5 * SR))]
    for seconds, gap in ((2.0, TURN_GAP_S), (1.5, TURN_GAP_S), (1.8, TURN_GAP_S)):
        parts += [np.resize(q, int(seconds * SR)), np.zeros(int(gap * SR))]
    return np.concatenate(parts).astype(np.float32)


def _video(path: Path, seconds: float, fps: int = 10) -> Path:
    import cv2

    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (640, 480))
    for i in range(int(seconds * fps)):
        f = np.full((480, 640, 3), 60, np.uint8)
        cv2.circle(f, (40 + (i * 9) % 560, 240), 50, (20, 200, 240), -1)
        w.write(f)
    w.release()
    return path


def tts_chunk_seconds(tts, spk: np.ndarray, repeats: int = 3) -> float:
    """One streaming TTS step: first text chunk prefill + 25 frames + decode (min of repeats)."""
    from edge.tts.backbone import build_text_mask

    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        st, sampler = tts.new_state(), tts.new_sampler()
        ids, n = tts.prompt_ids("This is one chunk of spoken reply text for timing.")
        begin, end = tts.chunk_range(0)
        tts.backbone.prefill_text(st.cache, ids[begin:end], begin, tts.speaker_embedding(spk))
        codes = tts.generate(st, build_text_mask(n, tts.dims), tts.options.codes_per_call, sampler)
        if codes.shape[0]:
            tts.decoder.codes_to_wav(codes)
        best = min(best, time.perf_counter() - t)
    return best


def run(bundle_path: str, *, overlap: bool, max_new_tokens: int, threads, tmp: Path, seed: int,
        variant: str = "int8") -> dict:
    from edge.bundle import Bundle
    from edge.io.camera import Camera, CameraOptions
    from edge.io.microphone import EnergyVad, FileMicrophone
    from edge.io.speaker import WavSink
    from edge.llm import LLMOptions
    from edge.omni import Omni, OmniOptions
    from edge.onnx_session import OrtOptions
    from edge.orchestrator import LiveOptions, Orchestrator, PacedSink
    from edge.streaming import StreamingSession
    from edge.tts.generate import TTS, TTSOptions

    ort = OrtOptions(intra_op_threads=threads.ort_threads, allow_spinning=False)
    bundle = Bundle.load(bundle_path)
    # prefill and the encoders (units, generation prompt) never overlap the TTS: every core, as Profile.for_live does
    omni = Omni.load(bundle, OmniOptions(llm=LLMOptions(n_ctx=8192, n_threads=threads.llm_threads,
                                                        n_threads_batch=threads.llm_threads + threads.ort_threads),
                                         ort=ort, encoder_ort=dataclasses.replace(
                                             ort, intra_op_threads=threads.llm_threads + threads.ort_threads),
                                         vision_variant=variant, audio_variant=variant, tts_variant=variant))
    # random-weight TTS rarely says EOS: cap a reply's speech (~4 s) so every reply fits the scripted pauses
    tts = TTS(bundle, variant=variant, ort=ort, options=TTSOptions(max_codes=MAX_CODES))
    import edge.llm

    reply_ids = omni.llm.tokenize(REPLY)
    real_sampler, edge.llm.Sampler = edge.llm.Sampler, lambda options: _ScriptedSampler(reply_ids)
    audio = _script()
    status: list[tuple[float, str]] = []  # the live status line over time: what the pipeline was doing
    t_start = time.perf_counter()
    orch = Orchestrator(StreamingSession(omni, tts=tts), FileMicrophone(audio),
                        camera=Camera(CameraOptions(str(_video(tmp / "cam.avi", audio.size / SR + 5)))),
                        sink=PacedSink(WavSink(), tts.sample_rate), vad=EnergyVad(), tts=tts,
                        options=LiveOptions(max_new_tokens=max_new_tokens, seed=seed, barge_in=False,
                                            overlap=overlap),
                        on_status=lambda text: status.append((round(time.perf_counter() - t_start, 3), text)))
    try:
        res = orch.run()
    finally:
        edge.llm.Sampler = real_sampler
    spk = np.random.default_rng(0).standard_normal(omni.llm.n_embd).astype(np.float32)
    chunk = tts_chunk_seconds(tts, spk)
    turns = []
    for t in res.turns:
        rel = {k: (getattr(t, k) - t.speech_end) if getattr(t, k) is not None else None
               for k in ("prefill_done", "first_token", "first_audio", "decode_end", "end")}
        dec = (t.decode_end - t.first_token) if t.first_token and t.decode_end else None
        turns.append({"turn": t.turn, "units": t.units, "tokens": t.tokens, "audio_seconds": round(t.audio_seconds, 3),
                      **{f"{k}_s": (round(v, 4) if v is not None else None) for k, v in rel.items()},
                      "decode_tok_s": round((t.tokens - 1) / dec, 2) if dec and t.tokens > 1 else None,
                      "target_ratio": round(rel["first_audio"] / (rel["first_token"] + chunk), 3)
                      if rel["first_audio"] is not None else None,
                      "abs": {k: getattr(t, k) for k in ("speech_end", "prefill_done", "first_token", "first_audio",
                                                         "decode_end", "end")}})
    omni.close()
    sink = orch.sink  # PacedSink: silences inside replies = what a listener hears as stalls
    return {"overlap": overlap, "tts_chunk_s": round(chunk, 4), "reply_text": REPLY, "turns": turns,
            "speech_gaps": sink.gaps, "speech_gap_seconds": round(sink.gap_seconds, 3),
            "speech_played_seconds": round(sink.played_seconds, 3),
            "errors": res.errors, "status_log": status,
            "end_reason": res.end_reason}


def plot(result: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    runs = result["runs"]
    fig, axes = plt.subplots(len(runs), 1, figsize=(10, 2.2 * len(runs)), squeeze=False)
    for ax, run_ in zip(axes[:, 0], runs):
        for t in run_["turns"]:
            a = t["abs"]
            y = t["turn"]
            ax.barh(y, a["prefill_done"] - a["speech_end"], left=a["speech_end"], color="tab:gray", label="prefill")
            if a["first_token"] and a["decode_end"]:
                ax.barh(y, a["decode_end"] - a["first_token"], left=a["first_token"], color="tab:blue",
                        label="decode")
            if a["first_audio"] and a["end"]:
                ax.barh(y - 0.3, a["end"] - a["first_audio"], left=a["first_audio"], height=0.3,
                        color="tab:orange", label="audio out")
            ax.axvline(a["speech_end"], color="k", lw=0.5)
        ax.set_title(f"overlap {'on' if run_['overlap'] else 'off'}")
        ax.set_xlabel("seconds since session start")
        ax.set_ylabel("turn")
    h, lab = axes[0, 0].get_legend_handles_labels()
    uniq = dict(zip(lab, h))
    axes[0, 0].legend(uniq.values(), uniq.keys(), loc="upper right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def main(argv=None) -> dict:
    from edge.orchestrator import ThreadSplit

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", required=True)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--threads", help="LLM,ORT threads (default: ThreadSplit.for_cores())")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variant", choices=("int8", "fp32"), default="int8",
                   help="ONNX graphs of vision, audio and TTS (what every device profile uses: int8)")
    a = p.parse_args(argv)
    split = ThreadSplit(*map(int, a.threads.split(","))) if a.threads else ThreadSplit.for_cores()
    runs = []
    with tempfile.TemporaryDirectory() as d:
        for overlap in (True, False):
            runs.append(run(a.bundle, overlap=overlap, max_new_tokens=a.max_new_tokens, threads=split,
                            tmp=Path(d), seed=a.seed, variant=a.variant))
    summary = {}
    for r in runs:
        key = "overlap_on" if r["overlap"] else "overlap_off"
        fa = [t["first_audio_s"] for t in r["turns"] if t["first_audio_s"] is not None]
        ft = [t["first_token_s"] for t in r["turns"] if t["first_token_s"] is not None]
        summary[key] = {"first_token_median_s": float(np.median(ft)) if ft else None,
                        "first_audio_median_s": float(np.median(fa)) if fa else None}
    on, off = summary.get("overlap_on", {}), summary.get("overlap_off", {})
    if on.get("first_audio_median_s") and off.get("first_audio_median_s"):
        summary["first_audio_gain_x"] = round(off["first_audio_median_s"] / on["first_audio_median_s"], 2)
    result = {"bench": "e2e", "bundle": str(a.bundle), "variant": a.variant, "threads": vars(split),
              "machine": machine(),
              "versions": versions("onnxruntime", "llama_cpp_python", "numpy"), "runs": runs, "summary": summary}
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    name = Path(a.bundle).name or "bundle"
    out = RESULTS / f"e2e-{name}-{stamp}.json"
    out.write_text(json.dumps(result, indent=1, default=float))
    png = out.with_suffix(".png")
    print(json.dumps(summary, indent=1))
    print(f"wrote {out}" + (f" and {png}" if plot(result, png) else " (no matplotlib: no PNG)"))
    return result


if __name__ == "__main__":
    main()
