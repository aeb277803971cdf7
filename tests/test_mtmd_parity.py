"""llama.cpp's mtmd on our mmproj GGUF (bench/mmproj_gguf.py) == the official vision output on the golden image.

bench/vision_mtmd.py times mtmd against our ONNX encoder "on the same weights"; these tests make sure that
claim holds, i.e. that the mmproj we write is read by libmtmd as the same model:

- against the golden reference (official PyTorch) for img0 (448x448: mtmd's resize is then a copy), with the
  f16 mmproj the published MiniCPM-o 2.6 files use and with mtmd's default settings;
- tightly, against the converter's torch module with ggml's two reduced-precision steps reproduced (so a
  wrong tensor name, transpose or q/k/v split cannot hide under the loose tolerance). Measured on the golden
  checkpoint, ggml differs from float32 math in exactly two places:
  1. `ggml_conv_2d` im2cols into f16 for any non-bf16 kernel, so the patch conv runs on f16 pixels and weights;
  2. the CPU GELU uses an f16 lookup table (`GGML_GELU_FP16` in ggml-cpu/vec.h: y = f16(gelu(f16(x))), with
     x <= -10 -> 0 and x >= 10 -> x).
  Plain float32 vs mtmd: max rel 9.0e-4; with both emulated: 1.3e-5. Flash attention (mtmd's default "auto")
  adds f16 K/V: 1.3e-3 with the f32 mmproj, 2.4e-3 with f16 weights.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tests.helpers import cosine, rel_err

pytest.importorskip("llama_cpp.mtmd_cpp")

# Published-dtype mmproj + mtmd defaults vs the official output (measured 2.4e-3, cosine 0.9999986).
LOOSE_MAX_REL = 5e-3
LOOSE_MIN_COSINE = 0.99999
# f32 mmproj, flash attention off, ggml's f16 steps emulated in torch (measured 1.3e-5).
TIGHT_MAX_REL = 1e-4
GELU_TABLE_LIMIT = 10.0  # ggml_vec_gelu_f32 bypasses its table outside (-10, 10)
THREADS = 1  # the host is shared: ggml's spinning barriers stall badly when oversubscribed


@pytest.fixture(scope="module")
def img0(golden_dir) -> Image.Image:
    return Image.open(golden_dir / "inputs" / "img0.png").convert("RGB")


@pytest.fixture(scope="module")
def mmproj(golden_ckpt, tmp_path_factory):
    from bench.mmproj_gguf import MmprojOptions, write_mmproj

    out = tmp_path_factory.mktemp("mmproj")
    return {d: write_mmproj(golden_ckpt, out / f"mmproj-{d}.gguf", MmprojOptions(dtype=d)) for d in ("f16", "f32")}


def _mtmd_embeds(mmproj_path, text_gguf, image: Image.Image, flash_attn: int) -> np.ndarray:
    from bench.vision_mtmd import MtmdOptions, MtmdVision

    mt = MtmdVision(mmproj_path, text_gguf, MtmdOptions(threads=THREADS, flash_attn=flash_attn, warmup=False))
    try:
        im = mt.tokenize(np.asarray(image))
        try:
            return np.stack(mt.encode(im))
        finally:
            mt.free(im)
    finally:
        mt.close()


def test_mtmd_matches_golden_with_published_dtype(mmproj, golden_gguf, golden_ref, img0):
    from bench.vision_mtmd import FLASH_ATTN_AUTO

    got = _mtmd_embeds(mmproj["f16"], golden_gguf("f32"), img0, FLASH_ATTN_AUTO)
    ref = golden_ref["img0_vision_embeds"]
    assert got.shape == ref.shape
    assert rel_err(got, ref) <= LOOSE_MAX_REL
    assert cosine(got, ref) >= LOOSE_MIN_COSINE


def test_mtmd_matches_torch_with_ggml_f16_steps(mmproj, golden_gguf, golden_ckpt, golden_ref, img0, monkeypatch):
    import torch
    import torch.nn.functional as F

    from converters.vision import VisionDims, build_torch_module
    from edge import vision as rt
    from edge.image_preprocess import preprocess_image

    got = _mtmd_embeds(mmproj["f32"], golden_gguf("f32"), img0, flash_attn=0)

    dims = VisionDims.from_checkpoint(golden_ckpt)
    module = build_torch_module(golden_ckpt, dims)
    pre = preprocess_image(img0)
    b = rt.build_batch(pre.slices, pre.tgt_sizes, pre.patch_size, dims.num_patches_per_side)
    exact_gelu = F.gelu

    def gelu_f16_table(x, approximate="none"):
        y = exact_gelu(x.half().float(), approximate="tanh").half().float()
        return torch.where(x <= -GELU_TABLE_LIMIT, torch.zeros_like(x), torch.where(x >= GELU_TABLE_LIMIT, x, y))

    def f16(a):
        return torch.from_numpy(a).half().float()

    with torch.no_grad():
        exact = module(*(torch.from_numpy(x) for x in (b.patches, b.position_ids, b.key_bias, b.grid_xy)))[0]
        monkeypatch.setattr(F, "gelu", gelu_f16_table)
        module.patch_w.data = module.patch_w.data.half().float()
        emulated = module(f16(b.patches), *(torch.from_numpy(x) for x in (b.position_ids, b.key_bias, b.grid_xy)))[0]
    # The torch module is the converter's (checked against golden elsewhere); the emulation explains the gap.
    assert rel_err(exact.numpy(), golden_ref["img0_vision_embeds"]) <= 1e-4
    assert rel_err(got, emulated.numpy()) <= TIGHT_MAX_REL
    assert rel_err(got, exact.numpy()) > TIGHT_MAX_REL  # the emulated steps are real, not a no-op


def test_pos_embed_k_is_the_resamplers_sincos(golden_ckpt):
    """The loader requires `resampler.pos_embed_k` (the graph recomputes it), so check the table on its own:
    row r*70+c must be the resampler's key position for column c, row r."""
    import torch

    from bench.mmproj_gguf import POS_EMBED_GRID, sincos_2d
    from converters.vision import VisionDims, build_torch_module

    dims = VisionDims.from_checkpoint(golden_ckpt)
    module = build_torch_module(golden_ckpt, dims)
    rows, cols = np.divmod(np.arange(POS_EMBED_GRID ** 2), POS_EMBED_GRID)
    grid_xy = torch.from_numpy(np.stack([cols, rows], axis=1).astype(np.float32))
    with torch.no_grad():
        ref = module.sincos(grid_xy).numpy()
    table = sincos_2d(dims.llm_hidden, POS_EMBED_GRID)
    assert table.shape == ref.shape
    assert rel_err(table, ref) <= 1e-6
