"""Speech-out speed: real-time factor of a streamed TTS reply, fp32 vs int8, split backbone / DVAE / Vocos / rest.

    python -m bench.tts [--scale tiny|full] [--seconds 20] [--threads 2] [--repeats 3] [--variants fp32,int8]

`--scale full` writes a random TTS-only checkpoint with the real ConditionalChatTTS dims (Llama 768 x 20 layers,
21178 text tokens, llm_dim 3584; the DVAE and Vocos are full size in every checkpoint) to a tmp dir (about 1 GB)
and exports it; `tiny` (default) uses the golden fixture's checkpoint (tiny Llama, full DVAE/Vocos). The reply is
generated with `TTS.stream` (official loop: 10 text tokens -> 25 frames, 4-frame context, 2048-sample overlap-add)
with EOS masked so that exactly `--seconds` of audio come out. RTF = compute time / audio duration; "first audio"
= time until the first chunk is yielded (the official loop holds the first chunk back). JSON to
bench/results/tts-*.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import peak_rss_gib, versions, write_result

GOLDEN_CKPT = Path(__file__).resolve().parents[2] / "shared" / "golden" / "ckpt"
# ConditionalChatTTS in MiniCPM-o 2.6 (spec §1.7) + the DVAE decoder sizes of the official DVAE class.
FULL = {"llm_dim": 3584, "hidden": 768, "ffn": 3072, "heads": 12, "layers": 20, "text_tokens": 21178,
        "audio_tokens": 626, "num_vq": 4, "dvae_blocks": 12}
INIT_STD = 0.02
TEXT = ("Hello world, this is a test. The quick brown fox jumps over the lazy dog, and then it rests for a "
        "while before running again. ") * 3


def write_full_checkpoint(root: Path) -> Path:
    """Random float32 TTS-only checkpoint with the real dims (enough for `converters.tts.export`)."""
    from safetensors.numpy import save_file

    d, rng, t = FULL, np.random.default_rng(0), {}
    h = d["hidden"]
    root.mkdir(parents=True, exist_ok=True)

    def rnd(*shape):
        return (INIT_STD * rng.standard_normal(shape)).astype(np.float32)

    t["tts.emb_text.weight"] = rnd(d["text_tokens"], h)
    for q in range(d["num_vq"]):
        t[f"tts.emb_code.{q}.weight"] = rnd(d["audio_tokens"], h)
        t[f"tts.head_code.{q}.parametrizations.weight.original0"] = 1 + rnd(d["audio_tokens"], 1)
        t[f"tts.head_code.{q}.parametrizations.weight.original1"] = rnd(d["audio_tokens"], h)
    t["tts.projector.linear1.weight"], t["tts.projector.linear1.bias"] = rnd(h, d["llm_dim"]), rnd(h)
    t["tts.projector.linear2.weight"], t["tts.projector.linear2.bias"] = rnd(h, h), rnd(h)
    for i in range(d["layers"]):
        p = f"tts.model.layers.{i}."
        for n in ("q", "k", "v", "o"):
            t[f"{p}self_attn.{n}_proj.weight"] = rnd(h, h)
        t[p + "mlp.gate_proj.weight"], t[p + "mlp.up_proj.weight"] = rnd(d["ffn"], h), rnd(d["ffn"], h)
        t[p + "mlp.down_proj.weight"] = rnd(h, d["ffn"])
        t[p + "input_layernorm.weight"], t[p + "post_attention_layernorm.weight"] = 1 + rnd(h), 1 + rnd(h)
    t["tts.model.norm.weight"] = 1 + rnd(h)
    p = "tts.dvae."
    t[p + "coef"] = rnd(1, 100, 1) + 1
    t[p + "out_conv.weight"] = rnd(100, 512, 3)
    for g in range(2):
        t[f"{p}vq_layer.quantizer.rvqs.{g}.project_out.weight"] = rnd(512, 4)
        t[f"{p}vq_layer.quantizer.rvqs.{g}.project_out.bias"] = rnd(512)
    p += "decoder."
    t[p + "conv_in.0.weight"], t[p + "conv_in.0.bias"] = rnd(128, 512, 3), rnd(128)
    t[p + "conv_in.2.weight"], t[p + "conv_in.2.bias"] = rnd(256, 128, 3), rnd(256)
    t[p + "conv_out.weight"] = rnd(512, 256, 1)
    for i in range(d["dvae_blocks"]):
        b = f"{p}decoder_block.{i}."
        t[b + "dwconv.weight"], t[b + "dwconv.bias"] = rnd(256, 1, 7), rnd(256)
        t[b + "norm.weight"], t[b + "norm.bias"] = 1 + rnd(256), rnd(256)
        t[b + "pwconv1.weight"], t[b + "pwconv1.bias"] = rnd(1024, 256), rnd(1024)
        t[b + "pwconv2.weight"], t[b + "pwconv2.bias"] = rnd(256, 1024), rnd(256)
        t[b + "coef"] = rnd(256)
    save_file(t, str(root / "model.safetensors"))
    golden_tts = json.loads((GOLDEN_CKPT / "config.json").read_text())["tts_config"]
    tts_cfg = {**golden_tts, "llm_dim": d["llm_dim"], "hidden_size": h, "intermediate_size": d["ffn"],
               "num_attention_heads": d["heads"], "num_hidden_layers": d["layers"],
               "num_text_tokens": d["text_tokens"]}
    (root / "config.json").write_text(json.dumps({"hidden_size": d["llm_dim"], "tts_config": tts_cfg}))
    # Vocos is full size in the golden fixture; its 174-entry tokenizer ids are valid in a 21178-row table.
    shutil.copytree(GOLDEN_CKPT / "assets", root / "assets")
    return root


class _Timed:
    """Wraps an onnxruntime session (or a function) and adds its wall time to `acc[name]`."""

    def __init__(self, inner, acc: dict, name: str):
        self.inner, self.acc, self.name = inner, acc, name
        acc.setdefault(name, 0.0)

    def run(self, *a, **k):
        t = time.perf_counter()
        try:
            return self.inner.run(*a, **k)
        finally:
            self.acc[self.name] += time.perf_counter() - t


def run_reply(bundle, variant: str, seconds: float, threads: int) -> dict:
    from edge.onnx_session import OrtOptions
    from edge.tts import TTS, SamplingOptions, TTSOptions

    probe = TTS(bundle, variant=variant, ort=OrtOptions(intra_op_threads=threads))
    frames = int(np.ceil(seconds * probe.sample_rate / probe.decoder.samples_per_code))
    opts = TTSOptions(sampling=SamplingOptions(seed=0, min_new_tokens=TTSOptions().codes_per_call),
                      max_codes=frames - 1)  # EOS masked in every step: exactly `frames` frames
    tts = TTS(bundle, variant=variant, ort=OrtOptions(intra_op_threads=threads), options=opts)
    acc: dict[str, float] = {}
    tts.backbone.session = _Timed(tts.backbone.session, acc, "backbone")
    tts.decoder.dvae = _Timed(tts.decoder.dvae, acc, "dvae")
    tts.decoder.vocos = _Timed(tts.decoder.vocos, acc, "vocos")
    mel_to_wav = tts.decoder.mel_to_wav

    def timed_mel_to_wav(mel):
        t = time.perf_counter()
        out = mel_to_wav(mel)
        acc["vocos+istft"] = acc.get("vocos+istft", 0.0) + time.perf_counter() - t
        return out

    tts.decoder.mel_to_wav = timed_mel_to_wav
    spk = np.random.default_rng(1).standard_normal((1, tts.dims.llm_dim)).astype(np.float32)
    pieces = [w + " " for w in TEXT.split()]
    states = []
    t0 = time.perf_counter()
    first, n = None, 0
    for chunk in tts.stream(pieces, spk, states=states):
        if chunk.size:  # empty chunks: one per text piece read while no audio is ready
            first = first or time.perf_counter() - t0
        n += chunk.shape[0]
    total = time.perf_counter() - t0
    audio_s = n / tts.sample_rate
    acc["istft"] = acc.pop("vocos+istft") - acc["vocos"]
    acc["rest"] = total - sum(acc.values())
    frames = sum(len(st.codes) for st in states)
    return {"variant": variant, "frames": frames, "audio_seconds": audio_s, "compute_seconds": total,
            "rtf": total / audio_s, "first_audio_seconds": first,
            "ms_per_frame_backbone": 1e3 * acc["backbone"] / frames,
            "split_seconds": acc, "split_rtf": {k: v / audio_s for k, v in acc.items()}}


def _summary(runs: list[dict]) -> dict:
    """Min and median over repeats: min = what the machine can do, median = what a user typically sees here."""
    def stat(key):
        vals = [r[key] for r in runs]
        return float(np.min(vals)), float(np.median(vals))

    (rmin, rmed), (bmin, bmed), (fmin, fmed) = (stat("rtf"), stat("ms_per_frame_backbone"),
                                                stat("first_audio_seconds"))
    return {"rtf_min": rmin, "rtf_median": rmed, "backbone_ms_min": bmin, "backbone_ms_median": bmed,
            "first_audio_min": fmin, "first_audio_median": fmed}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", choices=("tiny", "full"), default="tiny")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="runs per variant, fp32/int8 interleaved (noisy hosts)")
    ap.add_argument("--variants", default="fp32,int8", help="comma-separated: fp32, int8")
    a = ap.parse_args(argv)

    from converters.checkpoint import Checkpoint
    from converters.tts import export
    from edge import keys
    from edge.bundle import Bundle

    work = Path(tempfile.mkdtemp(prefix="bench_tts_"))
    try:
        if a.scale == "full":
            ckpt_dir, label = write_full_checkpoint(work / "ckpt"), "synthetic full-size TTS (random weights)"
        else:
            ckpt_dir, label = GOLDEN_CKPT, "golden tiny (tiny Llama, full DVAE/Vocos)"
        t0 = time.perf_counter()
        part = export(Checkpoint.open(ckpt_dir), work / "bundle", int8=True, progress=True)
        export_s = time.perf_counter() - t0
        bundle = Bundle(work / "bundle", keys.BUNDLE_SCHEMA_VERSION, keys.BUNDLE_ARCH, {}, {}, {},
                        {keys.PART_TTS: part})
        variants = [v.strip() for v in a.variants.split(",") if v.strip()]
        runs = []
        for _ in range(a.repeats):  # interleaved, so that a noisy stretch of the host hits both variants
            for v in variants:
                r = run_reply(bundle, v, a.seconds, a.threads)
                runs.append(r)
                split = ", ".join(f"{k} {x:.3f}" for k, x in r["split_rtf"].items())
                print(f"{r['variant']}: {r['audio_seconds']:.1f} s audio in {r['compute_seconds']:.1f} s -> RTF "
                      f"{r['rtf']:.3f} (first audio {r['first_audio_seconds']:.2f} s; backbone "
                      f"{r['ms_per_frame_backbone']:.1f} ms/frame; RTF split: {split})", flush=True)
        summary = {v: _summary([r for r in runs if r["variant"] == v]) for v in variants}
        for v, m in summary.items():
            print(f"{v}: RTF min {m['rtf_min']:.3f} median {m['rtf_median']:.3f}; backbone ms/frame min "
                  f"{m['backbone_ms_min']:.1f} median {m['backbone_ms_median']:.1f}; first audio min "
                  f"{m['first_audio_min']:.2f} s")
        write_result(f"tts-{a.scale}", {
            "checkpoint": label, "threads": a.threads, "export_seconds": export_s,
            "files_bytes": {r: f.bytes for r, f in part.files.items()}, "int8_cosine_probe": part.meta["int8_cosine"],
            "repeats": a.repeats, "summary": summary, "runs": runs, "peak_rss_gib": peak_rss_gib(),
            "versions": versions("numpy", "onnxruntime", "torch"),
        })
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
