"""Audio-in speed: one streaming 1-s chunk (warm KV cache) and a 30-s utterance, ONNX fp32 / int8 vs torch.

    python -m bench.audio [--ckpt DIR | --scale tiny|medium] [--threads 2] [--repeats 5] [--cache-seconds 10]

The torch side runs the converter's own torch modules (same weights, same math, eager mode), interleaved with
the onnxruntime sides in one process (the host is noisy). `--scale medium` writes a random audio-only
checkpoint with the real Whisper-medium encoder + 1024 -> 3584 projector dims to a tmp dir (about 1.2 GB) and
exports it; `tiny` (default) uses the golden fixture's checkpoint. RTF = compute time / audio duration.
Log-mel time (numpy) is reported separately. JSON to bench/results/audio-*.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import interleave, peak_rss_gib, timed, versions, write_result

GOLDEN_CKPT = Path(__file__).resolve().parents[2] / "shared" / "golden" / "ckpt"
# Whisper-medium encoder + MiniCPM-o 2.6 projector (spec §1.6).
MEDIUM = {"d_model": 1024, "layers": 24, "heads": 16, "ffn": 4096, "mels": 80, "positions": 1500, "llm": 3584}
INIT_STD = 0.02


def write_medium_checkpoint(root: Path) -> Path:
    """Random float32 audio-only checkpoint with the real dims (enough for `converters.audio_encoder.export`)."""
    from safetensors.numpy import save_file

    d, rng, t = MEDIUM, np.random.default_rng(0), {}
    m = d["d_model"]

    def rnd(*shape):
        return (INIT_STD * rng.standard_normal(shape)).astype(np.float32)

    t["apm.conv1.weight"], t["apm.conv1.bias"] = rnd(m, d["mels"], 3), rnd(m)
    t["apm.conv2.weight"], t["apm.conv2.bias"] = rnd(m, m, 3), rnd(m)
    t["apm.embed_positions.weight"] = rnd(d["positions"], m)
    for i in range(d["layers"]):
        p = f"apm.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            t[p + f"self_attn.{n}.weight"] = rnd(m, m)
            if n != "k_proj":
                t[p + f"self_attn.{n}.bias"] = rnd(m)
        t[p + "fc1.weight"], t[p + "fc1.bias"] = rnd(d["ffn"], m), rnd(d["ffn"])
        t[p + "fc2.weight"], t[p + "fc2.bias"] = rnd(m, d["ffn"]), rnd(m)
        for ln in ("self_attn_layer_norm", "final_layer_norm"):
            t[p + ln + ".weight"], t[p + ln + ".bias"] = 1 + rnd(m), rnd(m)
    t["apm.layer_norm.weight"], t["apm.layer_norm.bias"] = 1 + rnd(m), rnd(m)
    t["audio_projection_layer.linear1.weight"] = rnd(d["llm"], d["ffn"] // 4)
    t["audio_projection_layer.linear1.bias"] = rnd(d["llm"])
    t["audio_projection_layer.linear2.weight"] = rnd(d["llm"], d["llm"])
    t["audio_projection_layer.linear2.bias"] = rnd(d["llm"])
    save_file(t, str(root / "model.safetensors"))
    cfg = {"hidden_size": d["llm"], "audio_pool_step": 2, "audio_chunk_length": 1.0,
           "audio_config": {"d_model": m, "encoder_layers": d["layers"], "encoder_attention_heads": d["heads"],
                            "encoder_ffn_dim": d["ffn"], "num_mel_bins": d["mels"],
                            "max_source_positions": d["positions"], "activation_function": "gelu"}}
    (root / "config.json").write_text(json.dumps(cfg))
    return root


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", type=Path, default=None, help="checkpoint dir (default: the golden tiny one)")
    ap.add_argument("--scale", choices=("tiny", "medium"), default="tiny")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--cache-seconds", type=int, default=10, help="KV cache length before the timed chunk")
    a = ap.parse_args(argv)

    import torch

    torch.set_num_threads(a.threads)
    work = Path(tempfile.mkdtemp(prefix="bench_audio_"))
    try:
        run(a, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # the medium scale leaves ~3 GB otherwise


def run(a: argparse.Namespace, work: Path) -> None:
    import torch

    from converters.audio_encoder import AudioDims, export
    from converters.checkpoint import Checkpoint
    from edge import keys
    from edge.audio_encoder import AudioEncoder, chunk_mask, encoder_frames
    from edge.audio_features import LogMelExtractor
    from edge.bundle import Bundle
    from edge.onnx_session import OrtOptions
    from tests.audio_torch_ref import build_torch_modules

    if a.ckpt is not None:
        ckpt_dir, label = a.ckpt, str(a.ckpt)
    elif a.scale == "medium":
        ckpt_dir, label = write_medium_checkpoint(work), "synthetic whisper-medium + 3584 projector"
    else:
        ckpt_dir, label = GOLDEN_CKPT, "golden tiny"
    ckpt = Checkpoint.open(ckpt_dir)
    t0 = time.perf_counter()
    part = export(ckpt, work / "bundle", int8=True, progress=True)
    export_s = time.perf_counter() - t0
    bundle = Bundle(work / "bundle", keys.BUNDLE_SCHEMA_VERSION, keys.BUNDLE_ARCH, {}, {}, {},
                    {keys.PART_AUDIO: part})
    ort = OrtOptions(intra_op_threads=a.threads)
    encs = {v: AudioEncoder(bundle, variant=v, ort=ort) for v in ("fp32", "int8")}
    dims = AudioDims.from_checkpoint(ckpt)
    whole, stream = build_torch_modules(ckpt, dims)

    rng = np.random.default_rng(0)
    sr, seconds = 16_000, 30
    wave = (0.3 * np.sin(2 * np.pi * 440 * np.arange(seconds * sr) / sr)
            + 0.05 * rng.standard_normal(seconds * sr)).astype(np.float32)
    extractor = LogMelExtractor.create()
    mel_s = min(timed(lambda: extractor(wave)) for _ in range(3))
    mel30 = extractor(wave)
    chunks = [mel30[:, i:i + 100] for i in range(0, mel30.shape[1], 100)]
    s30 = encoder_frames(mel30.shape[1])
    mask30 = torch.from_numpy(chunk_mask(s30, 50))[None, None]

    # Warm caches of `cache_seconds` chunks, then time one more chunk (the cache is restored after each run).
    streams = {v: e.stream() for v, e in encs.items()}
    for st in streams.values():
        for c in chunks[: a.cache_seconds]:
            st.step(c)
    with torch.no_grad():
        empty = [torch.zeros(1, dims.n_heads, 0, dims.head_dim) for _ in range(2 * dims.n_layers)]
        past = empty
        for c in chunks[: a.cache_seconds]:
            past = list(stream(torch.from_numpy(c)[None], *past)[2:])
    timed_chunk = chunks[a.cache_seconds]

    def onnx_chunk(v):
        st = streams[v]
        saved = list(st._state.past)
        t = time.perf_counter()
        st.step(timed_chunk)
        dt = time.perf_counter() - t
        st._state.past = saved
        return dt

    def torch_chunk():
        with torch.no_grad():
            stream(torch.from_numpy(timed_chunk)[None], *past)

    def torch_whole():
        with torch.no_grad():
            whole(torch.from_numpy(mel30)[None], mask30)

    chunk_res = interleave({"onnx_fp32": lambda: onnx_chunk("fp32"), "onnx_int8": lambda: onnx_chunk("int8"),
                            "torch": torch_chunk}, a.repeats)
    def onnx_whole(v):
        encs[v].encode(mel30, chunked=True)  # returns None: interleave() times the call

    whole_res = interleave({"onnx_fp32": lambda: onnx_whole("fp32"), "onnx_int8": lambda: onnx_whole("int8"),
                            "torch": torch_whole}, max(2, a.repeats // 2))
    for res, dur in ((chunk_res, 1.0), (whole_res, float(seconds))):
        for side in res.values():
            side["rtf_median"] = side["median"] / dur
            side["ms_min"], side["ms_median"] = 1e3 * side["min"], 1e3 * side["median"]
    payload = {
        "checkpoint": label, "dims": {**vars(dims), "head_dim": dims.head_dim}, "threads": a.threads,
        "export_seconds": export_s, "onnx_bytes": {r: f.bytes for r, f in part.files.items()},
        "log_mel_30s_ms": 1e3 * mel_s,
        "stream_chunk_1s": {"cache_positions": a.cache_seconds * 50, **chunk_res},
        "utterance_30s_chunk_mask": whole_res,
        "peak_rss_gib": peak_rss_gib(),
        "versions": versions("numpy", "onnxruntime", "torch", "onnx"),
    }
    for name, res in (("1-s chunk", chunk_res), ("30-s utterance", whole_res)):
        print(name + ": " + ", ".join(f"{k} {v['ms_min']:.1f}/{v['ms_median']:.1f} ms (RTF {v['rtf_median']:.4f})"
                                      for k, v in res.items()))
    print(f"log-mel 30 s: {1e3 * mel_s:.1f} ms")
    write_result(f"audio-{a.scale if a.ckpt is None else 'ckpt'}", payload)


if __name__ == "__main__":
    main()
