"""Vision speed vs llama.cpp's own mtmd on the same weights: one 448x448 slice (and a 1344x1344 image).

    python -m bench.vision_mtmd [--ckpt DIR] [--bundle DIR] [--text-gguf FILE] [--threads 2] [--repeats 5]
                                [--image-repeats 2] [--mmproj-dtype f16|f32] [--skip-image]

The project's bar is "3x faster than llama.cpp's mtmd on the same weights". Sides, interleaved in one process
(the host is noisy), same thread count, min and median:
- `mtmd`: libmtmd as shipped in llama-cpp-python (`mtmd_tokenize` of one image, then `mtmd_encode_chunk` of each
  image chunk; preprocessing = mtmd_tokenize, timed separately), on an mmproj GGUF that bench/mmproj_gguf.py
  writes from the checkpoint (f16 by default: the dtype of the published MiniCPM-o 2.6 mmproj files);
- `onnx_fp32`, `onnx_int8`: our VisionEncoder on the bundle's vision part (preprocessing timed separately).
mtmd needs a text model for n_embd and the `<image>`/`<slice>` token ids: `--text-gguf` (default: the bundle's
`llm.gguf`) is loaded vocab-only, so no LLM weights are read.

Default checkpoint: the full-shape synthetic one (`<cache>/synth-full`, real SigLIP-400M dims, random weights).
Default bundle: `<cache>/bundles/full-q4_k_m`; when it has no vision part yet, the vision part is exported into
a tmp dir under the cache (~6 min, ~8 GB RAM) and deleted afterwards. A parity figure (mtmd vs ONNX fp32 on the
same image) is printed and stored. JSON to bench/results/vision_mtmd-<date>.json.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.common import interleave, peak_rss_gib, timed, versions, write_result

# libmtmd / ggml enums (tools/mtmd/mtmd.h, ggml.h).
FLASH_ATTN_AUTO = -1  # mtmd_context_params_default(); 0 = disabled, 1 = enabled
GGML_LOG_LEVEL_ERROR = 3
SLICE_SIDE = 448
IMAGE_SIDE = 1344


@ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
def _errors_only_log(level: int, text: bytes, user_data) -> None:
    """llama.cpp/mtmd log sink: errors to stderr, the (very chatty) rest dropped."""
    if level == GGML_LOG_LEVEL_ERROR:
        sys.stderr.write(text.decode(errors="replace"))


@dataclass(frozen=True)
class MtmdOptions:
    """threads: mtmd n_threads; flash_attn: mtmd's flash_attn_type (-1 auto = its default, 0 off, 1 on)."""

    threads: int = 2
    flash_attn: int = FLASH_ATTN_AUTO
    warmup: bool = True
    quiet: bool = True


@dataclass
class MtmdImage:
    """One image tokenized by mtmd: its chunk list (owned) and the image chunks in prompt order."""

    chunks: object
    image_chunks: list
    n_tokens: list[int]
    tokenize_s: float


class MtmdVision:
    """llama.cpp's libmtmd vision path on an mmproj GGUF: RGB uint8 image -> per-chunk embeddings."""

    def __init__(self, mmproj: Path, text_gguf: Path, options: MtmdOptions = MtmdOptions()):
        import llama_cpp
        from llama_cpp import mtmd_cpp

        self._ll, self._m, self.options = llama_cpp, mtmd_cpp, options
        for p, what in ((mmproj, "mmproj GGUF"), (text_gguf, "text GGUF")):
            if not Path(p).is_file():
                raise FileNotFoundError(f"{what} {p} does not exist; see `python -m bench.vision_mtmd --help`.")
        if options.quiet:
            llama_cpp.llama_log_set(_errors_only_log, None)
            mtmd_cpp.mtmd_log_set(_errors_only_log, None)
        llama_cpp.llama_backend_init()
        mp = llama_cpp.llama_model_default_params()
        mp.vocab_only = True  # mtmd only reads n_embd and token ids from the text model
        self._model = llama_cpp.llama_model_load_from_file(str(text_gguf).encode(), mp)
        if not self._model:
            raise RuntimeError(f"llama.cpp could not load the text model {text_gguf}.")
        cp = mtmd_cpp.mtmd_context_params_default()
        cp.use_gpu = False
        cp.n_threads = options.threads
        cp.print_timings = False
        cp.flash_attn_type = options.flash_attn
        cp.warmup = options.warmup
        self._ctx = mtmd_cpp.mtmd_init_from_file(str(mmproj).encode(), self._model, cp)
        if not self._ctx:
            llama_cpp.llama_model_free(self._model)
            raise RuntimeError(f"mtmd_init_from_file failed for {mmproj} (run with quiet=False for llama.cpp's log).")
        self.n_embd = mmproj_embd(mmproj)  # the text model reads n_embd 0 when loaded vocab-only

    def tokenize(self, rgb: np.ndarray) -> MtmdImage:
        """mtmd's own preprocessing (slicing, resize, normalisation) of an (H, W, 3) uint8 image."""
        m = self._m
        rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
        if rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ValueError(f"expected an (H, W, 3) uint8 RGB array, got shape {rgb.shape}.")
        h, w, _ = rgb.shape
        t = time.perf_counter()
        bitmap = m.mtmd_bitmap_init(w, h, (ctypes.c_uint8 * rgb.size).from_buffer_copy(rgb.tobytes()))
        chunks = m.mtmd_input_chunks_init()
        marker = m.mtmd_default_marker()
        text = m.mtmd_input_text(text=marker, text_len=len(marker), add_special=False, parse_special=True)
        rc = m.mtmd_tokenize(self._ctx, chunks, ctypes.byref(text), (m.mtmd_bitmap_p_ctypes * 1)(bitmap), 1)
        dt = time.perf_counter() - t
        m.mtmd_bitmap_free(bitmap)
        if rc != 0:
            m.mtmd_input_chunks_free(chunks)
            raise RuntimeError(f"mtmd_tokenize failed with code {rc}.")
        image_chunks, n_tokens = [], []
        for i in range(m.mtmd_input_chunks_size(chunks)):
            c = m.mtmd_input_chunks_get(chunks, i)
            if m.mtmd_input_chunk_get_type(c) == m.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                image_chunks.append(c)
                n_tokens.append(int(m.mtmd_input_chunk_get_n_tokens(c)))
        return MtmdImage(chunks, image_chunks, n_tokens, dt)

    def encode(self, image: MtmdImage, *, copy: bool = True) -> list[np.ndarray] | None:
        """mtmd_encode_chunk on each image chunk; with copy, the (n_tokens, n_embd) embeddings of each."""
        m, out = self._m, []
        for c, n in zip(image.image_chunks, image.n_tokens):
            rc = m.mtmd_encode_chunk(self._ctx, c)
            if rc != 0:
                raise RuntimeError(f"mtmd_encode_chunk failed with code {rc}.")
            if copy:
                ptr = m.mtmd_get_output_embd(self._ctx)
                out.append(np.ctypeslib.as_array(ptr, shape=(n * self.n_embd,)).reshape(n, self.n_embd).copy())
        return out if copy else None

    def free(self, image: MtmdImage) -> None:
        self._m.mtmd_input_chunks_free(image.chunks)
        image.image_chunks.clear()

    def close(self) -> None:
        if self._ctx:
            self._m.mtmd_free(self._ctx)
            self._ctx = None
        if self._model:
            self._ll.llama_model_free(self._model)
            self._model = None


def mmproj_embd(mmproj: Path) -> int:
    """Width of mtmd's output embeddings: the rows of `resampler.proj.weight` (clip_n_mmproj_embd)."""
    import gguf

    from bench.mmproj_gguf import PROJ_WEIGHT

    for t in gguf.GGUFReader(str(mmproj)).tensors:
        if t.name == PROJ_WEIGHT:
            return int(t.shape[1])  # GGUF shapes are ggml ne order: (in, out)
    raise ValueError(f"{mmproj} has no {PROJ_WEIGHT}; write it with bench/mmproj_gguf.py.")


def parity(a: np.ndarray, b: np.ndarray) -> dict:
    """cosine and max|a-b|/max|b| (the golden README's measure), b the reference."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return {"cosine": float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30)),
            "max_rel_err": float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))}


def main(argv=None) -> None:
    from edge import constants

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", type=Path, default=constants.cache_dir() / "synth-full")
    ap.add_argument("--bundle", type=Path, default=constants.bundles_dir() / "full-q4_k_m",
                    help="bundle with a vision part (exported to a tmp dir when it has none)")
    ap.add_argument("--text-gguf", type=Path, default=None, help="text GGUF of the same checkpoint "
                    "(default: the bundle's llm.gguf; read vocab-only)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5, help="rounds for the 448x448 slice")
    ap.add_argument("--image-repeats", type=int, default=2, help="rounds for the 1344x1344 image (10 slices)")
    ap.add_argument("--mmproj-dtype", choices=("f16", "f32"), default="f16")
    ap.add_argument("--skip-image", action="store_true", help="time only the single 448x448 slice")
    a = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench_vision_mtmd_", dir=constants.cache_dir()))
    try:
        run(a, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # mmproj (~0.9 GB) and, if exported here, the ONNX part (~2.5 GB)


def _vision_bundle(a: argparse.Namespace, ckpt, work: Path):
    """The bundle's vision part, or a fresh export into `work` when the bundle has none."""
    from converters import vision as conv
    from edge import keys
    from edge.bundle import Bundle

    if (a.bundle / "bundle.json").is_file():
        b = Bundle.load(a.bundle)
        if keys.PART_VISION in b.parts:
            return b, None
    print(f"{a.bundle} has no vision part: exporting {a.ckpt} to {work} (~6 min) ...", flush=True)
    t = time.perf_counter()
    part = conv.export(ckpt, work / "onnx", int8=True, progress=True)
    return Bundle(work / "onnx", keys.BUNDLE_SCHEMA_VERSION, keys.BUNDLE_ARCH, {}, {}, {},
                  {keys.PART_VISION: part}), time.perf_counter() - t


def run(a: argparse.Namespace, work: Path) -> None:
    from PIL import Image

    from bench.mmproj_gguf import MmprojOptions, write_mmproj
    from bench.vision import synthetic_image
    from converters.checkpoint import Checkpoint
    from edge import keys
    from edge import vision as rt
    from edge.image_preprocess import preprocess_image
    from edge.onnx_session import OrtOptions

    load_start = os.getloadavg()
    ckpt = Checkpoint.open(a.ckpt)
    text_gguf = a.text_gguf or a.bundle / keys.LLM_GGUF
    t = time.perf_counter()
    mmproj = write_mmproj(ckpt, work / f"mmproj-{a.mmproj_dtype}.gguf", MmprojOptions(dtype=a.mmproj_dtype))
    mmproj_s = time.perf_counter() - t
    bundle, export_s = _vision_bundle(a, ckpt, work)
    part = bundle.part(keys.PART_VISION)
    ort = OrtOptions(intra_op_threads=a.threads)
    encs = {v: rt.VisionEncoder(bundle, variant=v, ort=ort) for v in rt.VARIANTS if v in part.files}
    t = time.perf_counter()
    mt = MtmdVision(mmproj, text_gguf, MtmdOptions(threads=a.threads))
    mtmd_init_s = time.perf_counter() - t

    cases = {"slice_448": (SLICE_SIDE, a.repeats)}
    if not a.skip_image:
        cases["image_1344"] = (IMAGE_SIDE, a.image_repeats)
    results = {}
    for case_idx, (name, (side, repeats)) in enumerate(cases.items()):
        img: Image.Image = synthetic_image(side)
        pre = preprocess_image(img)
        mimg = mt.tokenize(np.asarray(img))
        ours_pre = min(timed(lambda: preprocess_image(img)) for _ in range(3))
        if len(mimg.image_chunks) != pre.n_slices:
            print(f"note: mtmd made {len(mimg.image_chunks)} image chunks, we make {pre.n_slices} slices")
        outs: dict[str, np.ndarray] = {}  # each side's latest output, for the parity figures

        def mtmd_side() -> None:
            outs["mtmd"] = np.stack(mt.encode(mimg))

        sides = {"mtmd": mtmd_side}
        sides.update({f"onnx_{v}": _runner(e, pre, outs, v) for v, e in encs.items()})
        if case_idx == 0:
            for fn in sides.values():  # warm-up (allocators, first-run kernel selection); later cases are warm
                fn()
        res = interleave(sides, repeats)
        for s in res.values():
            s["ms_min"], s["ms_median"] = 1e3 * s["min"], 1e3 * s["median"]
        res["mtmd"]["preprocess_ms"] = 1e3 * mimg.tokenize_s
        for v in encs:
            res[f"onnx_{v}"]["preprocess_ms"] = 1e3 * ours_pre
        ratios = {f"mtmd_over_onnx_{v}_{stat}": res["mtmd"][stat] / res[f"onnx_{v}"][stat]
                  for v in encs for stat in ("min", "median")}
        got = outs["mtmd"]
        par = {f"mtmd_vs_onnx_{v}": parity(got, outs[v]) for v in encs if outs[v].shape == got.shape}
        if "int8" in encs:
            par["onnx_int8_vs_onnx_fp32"] = parity(outs["int8"], outs["fp32"])
        results[name] = {"slices": pre.n_slices, "mtmd_image_chunks": len(mimg.image_chunks),
                         "mtmd_tokens_per_chunk": mimg.n_tokens, **res, "ratios": ratios, "parity": par}
        mt.free(mimg)
        print(f"{name}: " + ", ".join(f"{k} {v['ms_min']:.0f}/{v['ms_median']:.0f} ms"
                                      for k, v in res.items()) + " (min/median)")
        print("  ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()))
        print("  parity: " + ", ".join(f"{k} cos {v['cosine']:.6f} maxrel {v['max_rel_err']:.2e}"
                                      for k, v in par.items()))
    mt.close()
    payload = {
        "checkpoint": str(a.ckpt), "bundle": str(bundle.root), "text_gguf": str(text_gguf),
        "mmproj_dtype": a.mmproj_dtype, "mmproj_bytes": mmproj.stat().st_size, "mmproj_write_seconds": mmproj_s,
        "onnx_export_seconds": export_s, "mtmd_init_seconds": mtmd_init_s,
        "onnx_bytes": {r: f.bytes for r, f in part.files.items()}, "dims": part.meta,
        "threads": a.threads, "repeats": {k: r for k, (_, r) in cases.items()},
        "mtmd_flash_attn": "auto (mtmd default)",
        "host_load_avg_1_5_15": {"start": load_start, "end": os.getloadavg()},
        "results": results, "bar": "mtmd_over_onnx_int8 >= 3", "peak_rss_gib": peak_rss_gib(),
        "versions": versions("llama_cpp_python", "onnxruntime", "numpy", "gguf", "pillow"),
    }
    write_result("vision_mtmd", payload)


def _runner(encoder, pre, outs: dict, key: str):
    """A side for `interleave`: returns None so that the call itself is timed; keeps the output."""
    def run() -> None:
        outs[key] = encoder(pre)
    return run


if __name__ == "__main__":
    main()
