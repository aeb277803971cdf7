"""Vision speed: one 448x448 slice and a 1344x1344 image (10 slices), ONNX fp32 / int8 vs torch.

    python -m bench.vision [--bundle DIR] [--ckpt DIR | --scale tiny|full] [--threads 2] [--repeats 3]

Sides run interleaved in one process (the host is noisy) and report min and median. The torch side runs the
converter's own torch module (same weights, same math, eager float32); it needs the checkpoint (`--ckpt`, or a
`--scale`), so with `--bundle` alone only the ONNX sides run. Without `--bundle` the checkpoint is exported to a
tmp dir first: `--scale tiny` (default) is the golden fixture's checkpoint, `--scale full` writes a random
vision-only checkpoint with the real dims (SigLIP-400M 1152x27 + resampler to 3584; ~1 GB as float16) and
exports it (~2 GB fp32 graph as external data, ~0.5 GB int8). Preprocessing (numpy + PIL) is timed separately.
JSON to bench/results/vision-<date>.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from bench.common import interleave, peak_rss_gib, timed, versions, write_result

GOLDEN_CKPT = Path(__file__).resolve().parents[2] / "shared" / "golden" / "ckpt"
# SigLIP-so400m NaViT + MiniCPM-o 2.6 resampler (spec §1.4, §1.5).
FULL = {"hidden": 1152, "ffn": 4304, "heads": 16, "layers": 27, "patch": 14, "image_size": 980, "llm": 3584,
        "queries": 64}
INIT_STD = 0.02
SLICE_SIDE = 448  # one unsliced 448x448 image = one 32x32-patch slice
IMAGE_SIDE = 1344  # 3x3 grid + source = 10 slices of 32x32 patches


def write_full_vision_checkpoint(root: Path) -> Path:
    """Random float16 vision-only checkpoint with the real dims (enough for `converters.vision.export`)."""
    from safetensors.numpy import save_file

    d, rng, t = FULL, np.random.default_rng(0), {}
    h, e = d["hidden"], d["llm"]

    def rnd(*shape, base=0.0):
        return (base + INIT_STD * rng.standard_normal(shape, dtype=np.float32)).astype(np.float16)

    t["vpm.embeddings.patch_embedding.weight"] = rnd(h, 3, d["patch"], d["patch"])
    t["vpm.embeddings.patch_embedding.bias"] = rnd(h)
    t["vpm.embeddings.position_embedding.weight"] = rnd((d["image_size"] // d["patch"]) ** 2, h)
    for i in range(d["layers"]):
        p = f"vpm.encoder.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            t[p + f"self_attn.{n}.weight"], t[p + f"self_attn.{n}.bias"] = rnd(h, h), rnd(h)
        t[p + "mlp.fc1.weight"], t[p + "mlp.fc1.bias"] = rnd(d["ffn"], h), rnd(d["ffn"])
        t[p + "mlp.fc2.weight"], t[p + "mlp.fc2.bias"] = rnd(h, d["ffn"]), rnd(h)
        for ln in ("layer_norm1", "layer_norm2"):
            t[p + ln + ".weight"], t[p + ln + ".bias"] = rnd(h, base=1.0), rnd(h)
    t["vpm.post_layernorm.weight"], t["vpm.post_layernorm.bias"] = rnd(h, base=1.0), rnd(h)
    t["resampler.query"] = rnd(d["queries"], e)
    t["resampler.kv_proj.weight"] = rnd(e, h)
    t["resampler.attn.in_proj_weight"], t["resampler.attn.in_proj_bias"] = rnd(3 * e, e), rnd(3 * e)
    t["resampler.attn.out_proj.weight"], t["resampler.attn.out_proj.bias"] = rnd(e, e), rnd(e)
    t["resampler.proj"] = rnd(e, e)
    for ln in ("ln_q", "ln_kv", "ln_post"):
        t[f"resampler.{ln}.weight"], t[f"resampler.{ln}.bias"] = rnd(e, base=1.0), rnd(e)
    save_file(t, str(root / "model.safetensors"))
    cfg = {"hidden_size": e, "query_num": d["queries"], "vision_batch_size": 16, "drop_vision_last_layer": False,
           "slice_config": {"max_slice_nums": 9, "patch_size": d["patch"], "scale_resolution": SLICE_SIDE},
           "vision_config": {"hidden_size": h, "intermediate_size": d["ffn"], "num_attention_heads": d["heads"],
                             "num_hidden_layers": d["layers"], "patch_size": d["patch"],
                             "image_size": d["image_size"]}}
    (root / "config.json").write_text(json.dumps(cfg))
    return root


def synthetic_image(side: int) -> Image.Image:
    yy, xx = np.mgrid[0:side, 0:side]
    rgb = np.stack([xx * 255 // side, yy * 255 // side, ((xx // 32 + yy // 32) % 2) * 255], -1).astype(np.uint8)
    return Image.fromarray(rgb, "RGB")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, default=None, help="existing bundle dir with a vision part")
    ap.add_argument("--ckpt", type=Path, default=None, help="checkpoint dir (default: see --scale)")
    ap.add_argument("--scale", choices=("tiny", "full"), default="tiny")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-image", action="store_true", help="time only the single 448x448 slice")
    a = ap.parse_args(argv)

    import torch

    torch.set_num_threads(a.threads)
    work = Path(tempfile.mkdtemp(prefix="bench_vision_"))
    try:
        _run(a, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # the full-scale checkpoint + bundle take ~3.5 GB


def _run(a: argparse.Namespace, work: Path) -> None:
    import torch

    from converters.checkpoint import Checkpoint
    from converters.vision import VisionDims, export
    from edge import keys
    from edge import vision as rt
    from edge.bundle import Bundle
    from edge.image_preprocess import preprocess_image
    from edge.onnx_session import OrtOptions
    from tests.vision_torch_ref import build_torch_module

    ckpt = None
    if a.ckpt is not None:
        ckpt, label = Checkpoint.open(a.ckpt), str(a.ckpt)
    elif a.bundle is None or a.scale == "full":
        if a.scale == "full":
            print("writing a random full-size vision checkpoint ...", flush=True)
            ckpt, label = Checkpoint.open(write_full_vision_checkpoint(work)), "synthetic SigLIP-400M + 3584 resampler"
        else:
            ckpt, label = Checkpoint.open(GOLDEN_CKPT), "golden tiny"
    export_s = None
    if a.bundle is not None:
        bundle, label = Bundle.load(a.bundle), f"bundle {a.bundle}" + (f" + ckpt {label}" if ckpt else "")
    else:
        t0 = time.perf_counter()
        part = export(ckpt, work / "bundle", int8=True, progress=True)
        export_s = time.perf_counter() - t0
        bundle = Bundle(work / "bundle", keys.BUNDLE_SCHEMA_VERSION, keys.BUNDLE_ARCH, {}, {}, {},
                        {keys.PART_VISION: part})
    part = bundle.part(keys.PART_VISION)
    ort = OrtOptions(intra_op_threads=a.threads)
    variants = [v for v in rt.VARIANTS if v in part.files]
    encs = {v: rt.VisionEncoder(bundle, variant=v, ort=ort) for v in variants}
    module = build_torch_module(ckpt, VisionDims.from_checkpoint(ckpt)) if ckpt is not None else None

    cases = {"slice_448": SLICE_SIDE} if a.skip_image else {"slice_448": SLICE_SIDE, "image_1344": IMAGE_SIDE}
    results, cos = {}, {}
    for name, side in cases.items():
        img = synthetic_image(side)
        prep_s = min(timed(lambda: preprocess_image(img)) for _ in range(3))
        pre = preprocess_image(img)
        batch = rt.build_batch(pre.slices, pre.tgt_sizes, pre.patch_size, encs[variants[0]].num_patches_per_side)
        targs = tuple(torch.from_numpy(x) for x in (batch.patches, batch.position_ids, batch.key_bias, batch.grid_xy))
        sides = {f"onnx_{v}": _runner(e, pre) for v, e in encs.items()}
        if module is not None:
            def torch_side():
                with torch.no_grad():
                    module(*targs)
            sides["torch"] = torch_side
        for fn in sides.values():  # warm-up (allocator, first-run kernel selection)
            fn()
        res = interleave(sides, a.repeats)
        for side in res.values():
            side["ms_min"], side["ms_median"] = 1e3 * side["min"], 1e3 * side["median"]
            side["ms_per_slice_median"] = side["ms_median"] / pre.n_slices
        results[name] = {"slices": pre.n_slices, "patches_per_slice": [int(h * w) for h, w in pre.tgt_sizes],
                         "preprocess_ms": 1e3 * prep_s, **res}
        if "int8" in encs:
            f, q = encs["fp32"](pre).astype(np.float64).ravel(), encs["int8"](pre).astype(np.float64).ravel()
            cos[name] = float(f @ q / (np.linalg.norm(f) * np.linalg.norm(q)))
        print(f"{name} ({pre.n_slices} slices, preprocess {1e3 * prep_s:.1f} ms): " + ", ".join(
            f"{k} {v['ms_min']:.1f}/{v['ms_median']:.1f} ms" for k, v in res.items() if isinstance(v, dict)))
    payload = {
        "checkpoint": label, "dims": part.meta, "threads": a.threads, "repeats": a.repeats,
        "export_seconds": export_s, "onnx_bytes": {r: f.bytes for r, f in part.files.items()},
        "results": results, "int8_cosine_vs_fp32": cos,
        "peak_rss_gib": peak_rss_gib(),
        "versions": versions("numpy", "onnxruntime", "torch", "onnx", "pillow"),
    }
    print(f"int8 vs fp32 cosine: {cos}")
    write_result("vision", payload)


def _runner(encoder, pre):
    """A side for `interleave`: returns None so that the call itself is timed."""
    def run() -> None:
        encoder(pre)
    return run


if __name__ == "__main__":
    main()
