"""Image slicing/normalisation vs the golden fixture, vs an independent reference of the official algorithm,
and the image loader's handling of bad input."""

from __future__ import annotations

import io
import math
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from edge.errors import InvalidInputError
from edge.image_preprocess import (
    SliceOptions,
    image_placeholder,
    plan_slices,
    preprocess_image,
    reshape_by_patch,
    strip_to_patches,
)
from edge.io.images import ImageLoadOptions, load_image

# --- golden -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [0, 1, 2])
def test_golden_image(golden_dir, golden_ref, k):
    img = Image.open(golden_dir / "inputs" / f"img{k}.png").convert("RGB")
    pre = preprocess_image(img)
    assert tuple(golden_ref[f"img{k}_size"]) == img.size
    assert tuple(golden_ref[f"img{k}_grid"]) == (pre.grid or (0, 0))
    assert pre.placeholder == str(golden_ref[f"img{k}_placeholder"])
    np.testing.assert_array_equal(pre.tgt_sizes, golden_ref[f"img{k}_tgt_sizes"])
    assert pre.n_slices == len(golden_ref[f"img{k}_tgt_sizes"])
    for j, strip in enumerate(pre.slices):
        ref = golden_ref[f"img{k}_pixels_{j}"]
        assert strip.dtype == np.float32 and strip.shape == ref.shape
        np.testing.assert_array_equal(strip, ref)  # exact: same PIL BICUBIC, same float32 arithmetic


def test_golden_load_image_matches_pil_convert(golden_dir):
    """load_image on the golden PNGs gives the same pixels as the fixture's `Image.open(...).convert("RGB")`."""
    for k in range(3):
        path = golden_dir / "inputs" / f"img{k}.png"
        np.testing.assert_array_equal(np.asarray(load_image(path)), np.asarray(Image.open(path).convert("RGB")))


# --- independent reference of the official slicing algorithm ----------------------------------------------------

def _ref_slicing(w: int, h: int, max_n: int = 9, res: int = 448, p: int = 14):
    """Written from the official image_processing_minicpmv.py, separately from edge/image_preprocess.py:
    returns (grid or None, [slice (W, H) ...])."""

    def snap(x):  # ensure_divide
        return max(round(x / p) * p, p)

    def fit(sw, sh, upscale):  # find_best_resize
        if sw * sh > res * res or upscale:
            ratio = sw / sh
            sh = int(res / math.sqrt(ratio))
            sw = int(sh * ratio)
        return snap(sw), snap(sh)

    mult = min(math.ceil(w * h / (res * res)), max_n)
    grid = None
    if mult > 1:
        cands = [(m, n // m) for n in (mult - 1, mult, mult + 1) if 1 < n <= max_n
                 for m in range(1, n + 1) if n % m == 0]
        grid = min(cands, key=lambda g: abs(math.log(w / h) - math.log(g[0] / g[1])))  # first minimum wins
    if grid is None:
        return None, [fit(w, h, True)]
    cols, rows = grid
    rw, rh = max(round(w / cols) * cols, cols), max(round(h / rows) * rows, rows)
    cw, ch = fit(rw / cols, rh / rows, True)
    return grid, [fit(w, h, False)] + [(cw, ch)] * (cols * rows)


def _ref_placeholder(grid, idx: int, use_id: bool, q: int = 64) -> str:
    s = ("<image_id>%d</image_id>" % idx if use_id else "") + "<image>" + "<unk>" * q + "</image>"
    if grid:
        s += "\n".join("".join("<slice>" + "<unk>" * q + "</slice>" for _ in range(grid[0])) for _ in range(grid[1]))
    return s


PARITY_SIZES = [
    (1, 1), (1, 2), (2, 1), (13, 13), (14, 14), (15, 15), (100, 100), (447, 449), (448, 448), (449, 449),
    (500, 300), (640, 480), (800, 600), (895, 448), (896, 448), (448, 896), (1000, 300), (300, 1000),
    (1024, 768), (1280, 720), (1343, 1345), (1344, 1344), (1920, 1080), (2048, 2048), (3000, 4000),
    (4032, 3024), (6000, 100), (7, 3000), (10000, 50), (50, 10000), (1, 10000), (10000, 1), (10000, 10000),
    (20000, 15000), (65500, 65500), (12345, 678),
]


@pytest.mark.parametrize("size", PARITY_SIZES)
@pytest.mark.parametrize("max_n,use_id,idx", [(9, True, 0), (1, False, 0), (6, True, 3), (2, False, 0)])
def test_slicing_plan_matches_reference(size, max_n, use_id, idx):
    opts = SliceOptions(max_slice_nums=max_n, use_image_id=use_id)
    plan = plan_slices(size, opts)
    ref_grid, ref_sizes = _ref_slicing(*size, max_n=max_n)
    assert plan.grid == ref_grid
    assert plan.slice_sizes == ref_sizes
    assert all(sw % 14 == 0 and sh % 14 == 0 for sw, sh in plan.slice_sizes)
    assert image_placeholder(size, idx, opts) == _ref_placeholder(ref_grid, idx, use_id)


@pytest.mark.parametrize("size", [(1, 1), (15, 15), (640, 480), (1000, 300), (896, 448), (1920, 1080),
                                  (10000, 50), (50, 3000)])
def test_preprocess_pixels_follow_plan(size):
    """Full pixel path on real images: slice shapes/tgt_sizes as the reference says, values in [-1, 1]."""
    w, h = size
    rng = np.random.default_rng(w * 7 + h)
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
    pre = preprocess_image(img)
    grid, sizes = _ref_slicing(w, h)
    assert pre.grid == grid
    np.testing.assert_array_equal(pre.tgt_sizes, [(sh // 14, sw // 14) for sw, sh in sizes])
    for strip, (sw, sh) in zip(pre.slices, sizes):
        assert strip.shape == (3, 14, (sw // 14) * (sh // 14) * 14)
        assert strip.min() >= -1.0 and strip.max() <= 1.0


def test_crops_are_row_major_cells_of_refine_image():
    """Slice j (j >= 1) holds grid cell (row, col) = divmod(j - 1, cols) of the BICUBIC refine image."""
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (700, 1500, 3), dtype=np.uint8), "RGB")
    pre = preprocess_image(img)
    cols, rows = pre.grid
    refine = np.asarray(img.resize(pre.plan.refine_size, Image.Resampling.BICUBIC)).astype(np.float32)
    cw, ch = pre.plan.refine_size[0] // cols, pre.plan.refine_size[1] // rows
    for j in range(1, pre.n_slices):
        r, c = divmod(j - 1, cols)
        cell = refine[r * ch:(r + 1) * ch, c * cw:(c + 1) * cw]
        expect = reshape_by_patch(((cell / np.float32(255) - np.float32(0.5)) / np.float32(0.5)).transpose(2, 0, 1))
        np.testing.assert_array_equal(pre.slices[j], expect)


def test_strip_layout_definition():
    """`[c, r, n*14 + col]` = pixel `[c, py*14 + r, px*14 + col]` of patch n = py*w + px (golden README)."""
    rng = np.random.default_rng(1)
    h, w, p = 3, 5, 14
    chw = rng.standard_normal((3, h * p, w * p)).astype(np.float32)
    strip = reshape_by_patch(chw, p)
    for n in range(h * w):
        py, px = divmod(n, w)
        np.testing.assert_array_equal(strip[:, :, n * p:(n + 1) * p], chw[:, py * p:(py + 1) * p, px * p:(px + 1) * p])
        patch = chw[:, py * p:(py + 1) * p, px * p:(px + 1) * p]
        np.testing.assert_array_equal(strip_to_patches(strip, p)[n], patch.ravel())


# --- image loading: bad and odd input -------------------------------------------------------------------------

def _png_header_only(w: int, h: int) -> bytes:
    """A PNG whose IHDR claims w x h pixels (8-bit RGB) with almost no pixel data: a decompression-bomb probe."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def _jpeg_bytes(w: int, h: int, seed: int = 0, exif: bytes | None = None) -> bytes:
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx + yy) % 256], -1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buf, "JPEG", quality=95, **({"exif": exif} if exif else {}))
    return buf.getvalue()


def test_zero_byte_file(tmp_path):
    p = tmp_path / "empty.jpg"
    p.write_bytes(b"")
    with pytest.raises(InvalidInputError, match="empty"):
        load_image(p)
    with pytest.raises(InvalidInputError, match="empty"):
        load_image(b"")


def test_truncated_jpeg(tmp_path):
    data = _jpeg_bytes(300, 200)
    p = tmp_path / "cut.jpg"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(InvalidInputError, match="truncated or corrupt"):
        load_image(p)


def test_not_an_image(tmp_path):
    p = tmp_path / "notes.png"
    p.write_bytes(b"this is not an image at all")
    with pytest.raises(InvalidInputError, match="not an image format"):
        load_image(p)
    with pytest.raises(InvalidInputError, match="not found"):
        load_image(tmp_path / "missing.png")


def test_one_pixel_image_is_upscaled_like_official():
    """1x1 is accepted; the official find_best_resize(upscale) makes it a uniform 448x448 single slice."""
    img = load_image(np.full((1, 1, 3), (10, 200, 30), np.uint8))
    pre = preprocess_image(img)
    assert pre.grid is None
    np.testing.assert_array_equal(pre.tgt_sizes, [[32, 32]])
    expect = (np.array([10, 200, 30], np.float32) / np.float32(255) - np.float32(0.5)) / np.float32(0.5)
    np.testing.assert_array_equal(pre.slices[0], np.broadcast_to(expect[:, None, None], (3, 14, 32 * 32 * 14)))


@pytest.mark.parametrize("w,h", [(20000, 10000), (12000, 8000)])  # 200 MP (PIL's own bomb error), 96 MP (ours)
def test_huge_png_header_rejected(w, h):
    with pytest.raises(InvalidInputError, match="Downscale it"):
        load_image(_png_header_only(w, h))


def test_png_above_custom_limit_rejected():
    buf = io.BytesIO()
    Image.new("RGB", (400, 300), (1, 2, 3)).save(buf, "PNG")
    with pytest.raises(InvalidInputError, match="0.1 MP decoding limit"):
        load_image(buf.getvalue(), ImageLoadOptions(max_pixels=100_000))


def test_large_jpeg_is_draft_downscaled():
    """A JPEG above the limit is decoded at 1/2 DCT scale, close to a full decode + resize."""
    data = _jpeg_bytes(1600, 1200)
    img = load_image(data, ImageLoadOptions(max_pixels=500_000))
    assert img.size == (800, 600) and img.mode == "RGB"
    full = Image.open(io.BytesIO(data)).convert("RGB").resize((800, 600), Image.Resampling.BOX)
    diff = np.abs(np.asarray(img).astype(int) - np.asarray(full).astype(int))
    assert diff.mean() < 2.0, diff.mean()


def test_exif_orientation(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    data = _jpeg_bytes(120, 80, exif=exif.tobytes())
    assert load_image(data).size == (80, 120)
    assert load_image(data, ImageLoadOptions(apply_exif_orientation=False)).size == (120, 80)  # official


def test_mode_conversions():
    rgba = Image.new("RGBA", (4, 4), (200, 10, 10, 0))
    np.testing.assert_array_equal(np.asarray(load_image(rgba)), np.asarray(rgba.convert("RGB")))  # alpha dropped
    pal = Image.new("P", (4, 4))
    pal.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    pal.putpixel((1, 1), 1)
    np.testing.assert_array_equal(np.asarray(load_image(pal)), np.asarray(pal.convert("RGB")))
    cmyk = Image.new("CMYK", (4, 4), (10, 50, 100, 20))
    np.testing.assert_array_equal(np.asarray(load_image(cmyk)), np.asarray(cmyk.convert("RGB")))
    a16 = (np.arange(16, dtype=np.uint16).reshape(4, 4) * 4000)
    buf = io.BytesIO()
    Image.fromarray(a16).save(buf, "PNG")
    got = np.asarray(load_image(buf.getvalue()))
    np.testing.assert_array_equal(got[..., 0], np.clip(np.rint(a16 / 257.0), 0, 255).astype(np.uint8))
    clipped = np.asarray(load_image(buf.getvalue(), ImageLoadOptions(rescale_high_bit_depth=False)))
    np.testing.assert_array_equal(clipped, np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")))


def test_bad_arrays():
    with pytest.raises(InvalidInputError, match="HxWx3 uint8"):
        load_image(np.zeros((4, 4, 4), np.uint8))
    with pytest.raises(InvalidInputError, match="HxWx3 uint8"):
        load_image(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(InvalidInputError, match="no pixels"):
        load_image(np.zeros((0, 4, 3), np.uint8))
    with pytest.raises(InvalidInputError, match="cannot load"):
        load_image(12345)
