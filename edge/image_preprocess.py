"""MiniCPM-V 2.6 image slicing and normalisation, with numpy and PIL only (spec §2.1, §2.2).

This reproduces the official `MiniCPMVImageProcessor` (image_processing_minicpmv.py) step by step, because the
vision encoder was trained on exactly these crops: any other resize rule or crop order changes the embeddings.

Pipeline for one RGB image of size (W, H):
1. `get_sliced_grid`: how many slices (cols x rows) the image deserves, or None (no slicing).
2. Source image: resized with BICUBIC to `find_best_resize` (upscaling only when there is no grid).
3. With a grid: the "refine" image is resized to `get_refine_size` and cut row-major into cols x rows crops.
4. Every crop: /255, (x - mean) / std in float32, CHW, then `reshape_by_patch` into the (3, 14, h*w*14) strip
   layout the NaViT SigLIP consumes; `tgt_sizes` = (h, w) in patches.
5. The prompt placeholder: [<image_id>idx</image_id>] <image><unk>*64</image> then the grid rows of
   <slice><unk>*64</slice>, rows joined by "\\n".

All size arithmetic is plain Python (`round` is round-half-to-even, `int` truncates), as in the official code,
so results match it bit for bit for every input size, including extreme aspect ratios. `plan_slices` does the
arithmetic without touching pixels, which lets callers (and tests) check huge sizes cheaply.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from edge import keys
from edge.errors import InputLimitError, InvalidInputError

# Defaults of the 2.6 checkpoint's preprocessor_config.json / config.json slice_config (spec §1.3, §2.1).
PATCH_SIZE = 14
SCALE_RESOLUTION = 448
MAX_SLICE_NUMS = 9
IMAGE_FEATURE_SIZE = 64  # == config.query_num: resampler outputs per slice
NORM_MEAN = (0.5, 0.5, 0.5)
NORM_STD = (0.5, 0.5, 0.5)
PIXEL_SCALE = 255.0  # uint8 -> [0, 1], like `to_numpy_array(img).astype(float32) / 255`
RESAMPLE = Image.Resampling.BICUBIC  # the official resize filter
# Cost bound (not in the official processor, which has none): every slice aims at scale_resolution^2 pixels, i.e.
# (448 / 14)^2 = 1024 patches, and stays within 1.4x of that for aspect ratios up to ~1000:1. Beyond that the
# official arithmetic keeps one patch row and lets the width grow (a 200704x1 image -> one slice of 14336 patches,
# an attention matrix of 14336^2 per head). Twice the aimed size is refused with the reason.
MAX_SLICE_PATCHES_FACTOR = 2


@dataclass(frozen=True)
class SliceOptions:
    """Attributes:
    max_slice_nums: most slices per image (9 for chat; 1 for video frames / streaming, spec §2.1).
    scale_resolution: side of the square whose area a slice aims at (448).
    patch_size: SigLIP patch side (14); every slice side is a multiple of it.
    image_feature_size: `<unk>` tokens per slice (= query_num, 64).
    use_image_id: prefix `<image_id>idx</image_id>` (chat images: True; video frames: False).
    slice_mode: False = never slice (the official processor returns the image itself then).
    norm_mean, norm_std: per-channel normalisation after /255.
    """

    max_slice_nums: int = MAX_SLICE_NUMS
    scale_resolution: int = SCALE_RESOLUTION
    patch_size: int = PATCH_SIZE
    image_feature_size: int = IMAGE_FEATURE_SIZE
    use_image_id: bool = True
    slice_mode: bool = True
    norm_mean: tuple[float, float, float] = NORM_MEAN
    norm_std: tuple[float, float, float] = NORM_STD

    def __post_init__(self):
        if self.max_slice_nums < 1:
            raise InvalidInputError(f"max_slice_nums must be >= 1, got {self.max_slice_nums}.")

    @property
    def max_slice_patches(self) -> int:
        """Most patches one slice may have (see MAX_SLICE_PATCHES_FACTOR)."""
        return MAX_SLICE_PATCHES_FACTOR * (self.scale_resolution // self.patch_size) ** 2


@dataclass(frozen=True)
class SlicePlan:
    """Sizes only: what `preprocess_image` will resize and crop. Sizes are (W, H) in pixels."""

    original_size: tuple[int, int]
    source_size: tuple[int, int]
    grid: tuple[int, int] | None  # (cols, rows), None = no slicing
    refine_size: tuple[int, int] | None

    @property
    def slice_sizes(self) -> list[tuple[int, int]]:
        """Pixel size of every output slice in output order: source first, then the crops row-major."""
        out = [self.source_size]
        if self.grid is not None:
            cols, rows = self.grid
            cell = (self.refine_size[0] // cols, self.refine_size[1] // rows)
            out += [cell] * (cols * rows)
        return out


@dataclass
class PreprocessedImage:
    """What the vision encoder and the prompt builder need for one image.

    Attributes:
        slices: per slice a float32 array (3, patch, h*w*patch) in the official patch-strip layout:
            `[c, r, n*patch + col]` = pixel `[c, py*patch + r, px*patch + col]` of patch n = py*w + px.
        tgt_sizes: (n_slices, 2) int64, (h, w) in patches per slice, source first.
        grid: (cols, rows) or None when the image is not sliced.
        placeholder: the text that replaces `(<image>./</image>)` in the prompt.
        plan: the sizes used (original, source, refine, per slice).
        patch_size: patch side the strips were made with.
    """

    slices: list[np.ndarray]
    tgt_sizes: np.ndarray
    grid: tuple[int, int] | None
    placeholder: str
    plan: SlicePlan
    patch_size: int = PATCH_SIZE
    options: SliceOptions = field(default_factory=SliceOptions)

    @property
    def n_slices(self) -> int:
        return len(self.slices)


# --- size arithmetic (official algorithm) -----------------------------------------------------------------------

def ensure_divide(length: float, patch_size: int) -> int:
    """Nearest multiple of `patch_size` (Python round: half to even), at least one patch."""
    return max(round(length / patch_size) * patch_size, patch_size)


def find_best_resize(size: tuple[float, float], scale_resolution: int, patch_size: int,
                     allow_upscale: bool = False) -> tuple[int, int]:
    """Keep the aspect ratio, aim at scale_resolution^2 pixels (only shrink unless allow_upscale)."""
    width, height = size
    if width * height > scale_resolution * scale_resolution or allow_upscale:
        r = width / height
        height = int(scale_resolution / math.sqrt(r))
        width = int(height * r)
    return ensure_divide(width, patch_size), ensure_divide(height, patch_size)


def get_refine_size(size: tuple[int, int], grid: tuple[int, int], scale_resolution: int, patch_size: int,
                    allow_upscale: bool = False) -> tuple[int, int]:
    """Size of the image the grid crops are cut from: every cell gets a best resize of its own."""
    width, height = size
    grid_x, grid_y = grid
    refine_width = ensure_divide(width, grid_x)
    refine_height = ensure_divide(height, grid_y)
    cell = find_best_resize((refine_width / grid_x, refine_height / grid_y), scale_resolution, patch_size,
                            allow_upscale=allow_upscale)
    return cell[0] * grid_x, cell[1] * grid_y


def get_sliced_grid(size: tuple[int, int], max_slice_nums: int, scale_resolution: int = SCALE_RESOLUTION,
                    never_split: bool = False) -> tuple[int, int] | None:
    """(cols, rows) whose aspect ratio is closest (in log) to the image's, or None for no slicing.

    The slice count aims at area / scale_resolution^2, capped at max_slice_nums; counts multiple-1, multiple and
    multiple+1 (never 1) are tried with all their factorizations, the first best one wins.
    """
    width, height = size
    log_ratio = math.log(width / height)
    ratio = width * height / (scale_resolution * scale_resolution)
    multiple = min(math.ceil(ratio), max_slice_nums)
    if multiple <= 1 or never_split:
        return None
    best, best_err = (1, 1), float("inf")
    for n in (multiple - 1, multiple, multiple + 1):
        if n == 1 or n > max_slice_nums:
            continue
        for m in range(1, n + 1):
            if n % m:
                continue
            err = abs(log_ratio - math.log(m / (n // m)))
            if err < best_err:
                best, best_err = (m, n // m), err
    return best


def plan_slices(size: tuple[int, int], options: SliceOptions = SliceOptions()) -> SlicePlan:
    """All sizes of `slice_image` for an image of `size` (W, H), without pixels."""
    w, h = int(size[0]), int(size[1])
    if w < 1 or h < 1:
        raise InvalidInputError(f"image size {w}x{h} is empty; pass an image of at least 1x1 pixels.")
    if not options.slice_mode:  # the official processor then passes the image through unchanged
        if w % options.patch_size or h % options.patch_size:
            raise InvalidInputError(
                f"with slice_mode=False the image must already be a multiple of {options.patch_size} px "
                f"on both sides, got {w}x{h}; enable slice_mode or resize it first.")
        return SlicePlan((w, h), (w, h), None, None)
    res, p = options.scale_resolution, options.patch_size
    grid = get_sliced_grid((w, h), options.max_slice_nums, res)
    if grid is None:
        plan = SlicePlan((w, h), find_best_resize((w, h), res, p, allow_upscale=True), None, None)
    else:
        source = find_best_resize((w, h), res, p)
        plan = SlicePlan((w, h), source, grid, get_refine_size((w, h), grid, res, p, allow_upscale=True))
    return plan


def check_slice_cost(plan: SlicePlan, options: SliceOptions = SliceOptions()) -> SlicePlan:
    """`plan` if its largest slice is within `options.max_slice_patches`, else InputLimitError with the reason
    (extreme aspect ratios). Separate from `plan_slices`, which stays the official arithmetic for any size."""
    p = options.patch_size
    worst = max((sw // p) * (sh // p) for sw, sh in plan.slice_sizes)
    if worst > options.max_slice_patches:
        w, h = plan.original_size
        raise InputLimitError(
            f"image {w}x{h} (aspect ratio {max(w, h) / min(w, h):.0f}:1) would make a slice of {worst} patches; "
            f"the slicer aims at {(options.scale_resolution // p) ** 2} per slice and the limit is "
            f"{options.max_slice_patches}. Crop or pad the image to an aspect ratio under about 1000:1.")
    return plan


# --- placeholder text -------------------------------------------------------------------------------------------

def grid_placeholder(grid: tuple[int, int] | None, image_feature_size: int = IMAGE_FEATURE_SIZE) -> str:
    if grid is None:
        return ""
    cols, rows = grid
    one = keys.SLICE_START + keys.UNK * image_feature_size + keys.SLICE_END
    return "\n".join(one * cols for _ in range(rows))


def image_placeholder(size: tuple[int, int], image_idx: int = 0, options: SliceOptions = SliceOptions()) -> str:
    """`get_slice_image_placeholder(size, image_idx, max_slice_nums, use_image_id)` of the official processor."""
    text = keys.IMAGE_START + keys.UNK * options.image_feature_size + keys.IMAGE_END
    if options.use_image_id:
        text = f"{keys.IMAGE_ID_START}{image_idx}{keys.IMAGE_ID_END}" + text
    if options.slice_mode:
        grid = get_sliced_grid(size, options.max_slice_nums, options.scale_resolution)
        text += grid_placeholder(grid, options.image_feature_size)
    return text


# --- pixels -----------------------------------------------------------------------------------------------------

def slice_image(image: Image.Image, plan: SlicePlan) -> list[Image.Image]:
    """Source image then the grid crops row-major (PIL BICUBIC resizes, as the official `slice_image`)."""
    out = [image.resize(plan.source_size, resample=RESAMPLE)]  # PIL returns a copy for an equal size
    if plan.grid is not None:
        refine = image.resize(plan.refine_size, resample=RESAMPLE)
        cols, rows = plan.grid
        cw, ch = plan.refine_size[0] // cols, plan.refine_size[1] // rows
        for r in range(rows):
            for c in range(cols):
                out.append(refine.crop((c * cw, r * ch, (c + 1) * cw, (r + 1) * ch)))
    return out


def normalize(image: Image.Image, mean=NORM_MEAN, std=NORM_STD) -> np.ndarray:
    """uint8 HWC -> float32 CHW: x/255 then (x - mean)/std, all in float32 like transformers' `normalize`."""
    x = np.asarray(image, dtype=np.uint8).astype(np.float32) / np.float32(PIXEL_SCALE)
    x = (x - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def reshape_by_patch(chw: np.ndarray, patch_size: int = PATCH_SIZE) -> np.ndarray:
    """(3, H, W) -> (3, p, (H/p)*(W/p)*p): patches laid side by side, row-major (torch `unfold` order)."""
    c, hh, ww = chw.shape
    h, w = hh // patch_size, ww // patch_size
    x = chw.reshape(c, h, patch_size, w, patch_size).transpose(0, 2, 1, 3, 4)
    return np.ascontiguousarray(x.reshape(c, patch_size, h * w * patch_size))


def strip_to_patches(strip: np.ndarray, patch_size: int = PATCH_SIZE) -> np.ndarray:
    """(3, p, L*p) strip -> (L, 3*p*p) rows flattened as (c, r, col), the order of the patch conv weight."""
    c, p, lp = strip.shape
    n = lp // p
    return strip.reshape(c, p, n, p).transpose(2, 0, 1, 3).reshape(n, c * p * p)


def preprocess_image(image: Image.Image, options: SliceOptions = SliceOptions(),
                     image_idx: int = 0) -> PreprocessedImage:
    """Slice, normalise and patch-flatten one image; `image` must be RGB (see `edge.io.images.load_image`)."""
    if not isinstance(image, Image.Image):
        raise InvalidInputError(
            f"preprocess_image needs a PIL.Image, got {type(image).__name__}; load it with edge.io.images.load_image.")
    if image.mode != "RGB":
        raise InvalidInputError(
            f"preprocess_image needs an RGB image, got mode {image.mode!r}; load it with "
            "edge.io.images.load_image (it converts like the official processor).")
    plan = check_slice_cost(plan_slices(image.size, options), options)  # before any pixel work
    p = options.patch_size
    slices, tgt = [], []
    for img in slice_image(image, plan):
        chw = normalize(img, options.norm_mean, options.norm_std)
        slices.append(reshape_by_patch(chw, p))
        tgt.append((chw.shape[1] // p, chw.shape[2] // p))
    return PreprocessedImage(
        slices=slices,
        tgt_sizes=np.asarray(tgt, dtype=np.int64).reshape(-1, 2),
        grid=plan.grid,
        placeholder=image_placeholder(image.size, image_idx, options),
        plan=plan,
        patch_size=p,
        options=options,
    )
