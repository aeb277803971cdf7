"""Vision encoder runtime: SigLIP NaViT + resampler as one ONNX graph (from converters/vision.py), numpy around it.

The graph is a pure function of four per-patch inputs; the data-dependent index work of the official code
(modeling_navit_siglip.py and resampler.py) is done here in numpy, because it is cheap, exact and awkward to
export:

- `patches` (B, L, 3*14*14): the slices' patch-strip pixels regrouped per patch, zero-padded to the longest
  slice of the batch (the official code pads the strips the same way; padded rows never reach the output).
- `position_ids` (B, L) int64: NaViT bucketed positions into the 70x70 SigLIP table (see `navit_position_ids`).
- `key_bias` (B, L) float32: 0 for real patches, float32 min for padding. The official code adds the same
  value to SigLIP's attention scores (`_prepare_4d_attention_mask`) and masks the resampler's keys with it
  (-inf there; both give an exact 0 after softmax).
- `grid_xy` (B, L, 2) float32: the (column, row) of each patch in its slice; the graph turns it into the
  resampler's 2-D sin/cos key position (`get_2d_sincos_pos_embed`, computed for any size, so slices wider or
  taller than 70 patches need no cache resize).

Outputs: `vision_embeds` (B, 64, llm_hidden) and `vpm_out` (B, L, vision_hidden), the SigLIP last hidden state
the resampler reads (only the first h*w rows of a slice are meaningful).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edge import keys
from edge.bundle import Bundle
from edge.errors import InvalidInputError
from edge.image_preprocess import PreprocessedImage, strip_to_patches
from edge.onnx_session import OrtOptions, make_session

# Bundle files and roles of the vision part (written by converters/vision.py).
FILE_FP32 = "vision.onnx"
FILE_FP32_DATA = "vision.onnx.data"  # only when the fp32 graph is too big for one protobuf (real checkpoint)
FILE_INT8 = "vision.int8.onnx"
ROLE_FP32 = "fp32"
ROLE_FP32_DATA = "fp32_data"
ROLE_INT8 = "int8"
VARIANTS = (ROLE_FP32, ROLE_INT8)

# Graph input / output names.
IN_PATCHES = "patches"
IN_POSITION_IDS = "position_ids"
IN_KEY_BIAS = "key_bias"
IN_GRID_XY = "grid_xy"
OUT_EMBEDS = "vision_embeds"
OUT_VPM = "vpm_out"

# Additive mask value for padded keys: what the official `_prepare_4d_attention_mask` fills in.
MASK_VALUE = np.float32(np.finfo(np.float32).min)
# Slices per vpm call in the official code (config.vision_batch_size); bounds peak memory.
VISION_BATCH_SIZE = 16
# torch's CPU `arange` kernel for float32 fills 2 x 8-lane vectors per step (checked against torch 2.13 on
# x86-64 for every patch count 1..3000 in tests/test_vision.py); the lanes matter at exact bucket ties.
_TORCH_ARANGE_LANES = 8
# NaViT stops its fractional coordinates just below 1 (`torch.arange(0, 1 - 1e-6, 1 / n)`).
_NAVIT_END = 1 - 1e-6


def torch_arange_f32(start: float, end: float, step: float) -> np.ndarray:
    """float32 `torch.arange(start, end, step)` on CPU, bit for bit.

    torch computes in double and rounds each element to float32, but its vectorised loop rounds the base of
    every 8-lane vector to float32 first, then adds lane * step in double. At exact ties with the NaViT bucket
    boundaries that last-bit difference decides the bucket, so it is reproduced here.
    """
    n = int(np.ceil((end - start) / step))
    out = np.empty(max(n, 0), dtype=np.float32)
    lanes, i = _TORCH_ARANGE_LANES, 0
    lane_steps = np.arange(lanes, dtype=np.float64) * step
    while i + 2 * lanes <= n:
        for base_idx in (i, i + lanes):
            base = np.float64(np.float32(start + step * base_idx))
            out[base_idx:base_idx + lanes] = (base + lane_steps).astype(np.float32)
        i += 2 * lanes
    out[i:] = (start + step * np.arange(i, n, dtype=np.float64)).astype(np.float32)
    return out


def navit_position_ids(h: int, w: int, num_patches_per_side: int) -> np.ndarray:
    """(h*w,) int64 ids into the SigLIP position table for an h x w patch grid (official bucketize rule).

    Fractional coordinates i/h (i < h) are bucketed against the boundaries k/S (k = 1..S-1, S = patches per
    side, 70) with `bucketize(right=True)`, i.e. the count of boundaries <= the coordinate.
    """
    side = num_patches_per_side
    boundaries = torch_arange_f32(1 / side, 1.0, 1 / side)

    def buckets(n: int) -> np.ndarray:
        step = float(np.float32(1.0) / np.float32(n))  # `1 / tgt_size` is a float32 tensor in the official code
        coords = torch_arange_f32(0.0, _NAVIT_END, step)
        return np.searchsorted(boundaries, coords, side="right").astype(np.int64)

    bh, bw = buckets(h), buckets(w)
    if bh.shape[0] != h or bw.shape[0] != w:  # cannot happen for h, w >= 1; guards the 1e-6 end rule
        raise AssertionError(f"NaViT coordinate count mismatch for {h}x{w}: {bh.shape[0]}, {bw.shape[0]}")
    return (bh[:, None] * side + bw[None, :]).reshape(-1)


def patch_grid_xy(h: int, w: int) -> np.ndarray:
    """(h*w, 2) float32 (column, row) of each patch, row-major: the resampler's sin/cos grid coordinates."""
    rows, cols = np.divmod(np.arange(h * w), w)
    return np.stack([cols, rows], axis=1).astype(np.float32)


@dataclass
class VisionBatch:
    """Graph inputs for one batch of slices, plus each slice's valid patch count."""

    patches: np.ndarray
    position_ids: np.ndarray
    key_bias: np.ndarray
    grid_xy: np.ndarray
    lengths: list[int]

    def feeds(self) -> dict[str, np.ndarray]:
        return {IN_PATCHES: self.patches, IN_POSITION_IDS: self.position_ids, IN_KEY_BIAS: self.key_bias,
                IN_GRID_XY: self.grid_xy}


def build_batch(strips: list[np.ndarray], tgt_sizes: np.ndarray, patch_size: int,
                num_patches_per_side: int) -> VisionBatch:
    """Pad slices to the longest and compute the index inputs (what the official code does with torch)."""
    sizes = [(int(h), int(w)) for h, w in np.asarray(tgt_sizes).reshape(-1, 2)]
    if len(sizes) != len(strips) or not strips:
        raise InvalidInputError(f"got {len(strips)} slices but {len(sizes)} tgt_sizes; pass a PreprocessedImage.")
    lengths = [h * w for h, w in sizes]
    b, length, dim = len(strips), max(lengths), 3 * patch_size * patch_size
    patches = np.zeros((b, length, dim), np.float32)
    pos = np.zeros((b, length), np.int64)
    bias = np.full((b, length), MASK_VALUE, np.float32)
    grid = np.zeros((b, length, 2), np.float32)
    for i, (strip, (h, w), n) in enumerate(zip(strips, sizes, lengths)):
        if strip.shape != (3, patch_size, n * patch_size):
            raise InvalidInputError(
                f"slice {i} has shape {strip.shape}, expected (3, {patch_size}, {n * patch_size}) for "
                f"{h}x{w} patches; build inputs with edge.image_preprocess.preprocess_image.")
        patches[i, :n] = strip_to_patches(strip, patch_size)
        pos[i, :n] = navit_position_ids(h, w, num_patches_per_side)
        bias[i, :n] = 0.0
        grid[i, :n] = patch_grid_xy(h, w)
    return VisionBatch(patches, pos, bias, grid, lengths)


@dataclass
class VisionOutput:
    """Attributes:
    embeds: (n_slices, query_num, llm_hidden) float32, in slice order (source first), for the `<unk>` spans.
    vpm_out: per slice the SigLIP last hidden state of its real patches, (h*w, vision_hidden); None unless asked.
    """

    embeds: np.ndarray
    vpm_out: list[np.ndarray] | None = None


class VisionEncoder:
    """Runs the vision ONNX graph on preprocessed images: `encoder(pre) -> (n_slices, 64, llm_hidden)`."""

    def __init__(self, bundle: Bundle, *, variant: str = ROLE_FP32, ort: OrtOptions | None = None):
        if variant not in VARIANTS:
            raise InvalidInputError(f"vision variant must be one of {VARIANTS}, got {variant!r}.")
        meta = bundle.part(keys.PART_VISION).meta
        self.variant = variant
        self.patch_size = int(meta["patch_size"])
        self.num_patches_per_side = int(meta["num_patches_per_side"])
        self.query_num = int(meta["query_num"])
        self.llm_hidden = int(meta["llm_hidden"])
        self.vision_hidden = int(meta["vision_hidden"])
        self.batch_size = int(meta.get("vision_batch_size", VISION_BATCH_SIZE))
        self.session = make_session(bundle.file(keys.PART_VISION, variant), ort)

    def __call__(self, pre: PreprocessedImage | list[PreprocessedImage]) -> np.ndarray:
        return self.encode(pre).embeds

    def encode(self, pre: PreprocessedImage | list[PreprocessedImage], *, return_vpm: bool = False) -> VisionOutput:
        """Encode all slices of one image (or of several images, concatenated in order)."""
        images = [pre] if isinstance(pre, PreprocessedImage) else list(pre)
        strips = [s for p in images for s in p.slices]
        tgt = np.concatenate([np.asarray(p.tgt_sizes).reshape(-1, 2) for p in images]) if images else np.zeros((0, 2))
        for p in images:
            if p.patch_size != self.patch_size:
                raise InvalidInputError(
                    f"image was preprocessed with patch size {p.patch_size}, the vision model uses "
                    f"{self.patch_size}; preprocess with SliceOptions(patch_size={self.patch_size}).")
        return self.encode_slices(strips, tgt, return_vpm=return_vpm)

    def encode_slices(self, strips: list[np.ndarray], tgt_sizes: np.ndarray, *,
                      return_vpm: bool = False) -> VisionOutput:
        """Encode slices in batches of `vision_batch_size` (each padded to its own longest slice)."""
        if not strips:
            return VisionOutput(np.zeros((0, self.query_num, self.llm_hidden), np.float32), [] if return_vpm else None)
        outputs = [OUT_EMBEDS, OUT_VPM] if return_vpm else [OUT_EMBEDS]
        embeds, vpm = [], []
        for start in range(0, len(strips), self.batch_size):
            stop = start + self.batch_size
            batch = build_batch(strips[start:stop], tgt_sizes[start:stop], self.patch_size,
                                self.num_patches_per_side)
            result = self.session.run(outputs, batch.feeds())
            embeds.append(result[0])
            if return_vpm:
                vpm += [result[1][i, :n] for i, n in enumerate(batch.lengths)]
        return VisionOutput(np.concatenate(embeds, axis=0), vpm if return_vpm else None)
