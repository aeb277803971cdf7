"""Image input: a path, encoded bytes, a PIL image or an HxWx3 uint8 array -> a fully loaded RGB PIL image.

The official processor does `image.convert("RGB")` on whatever PIL image it is given; this module does the same
so that pixels match it, and adds the checks a runtime needs. Policy, mode by mode:

- RGB, L (grey), 1 (bilevel), P (palette), YCbCr, LAB, HSV: `convert("RGB")`, exactly as the official code.
- RGBA, LA, PA and palette images with a transparent colour: alpha is DROPPED by `convert("RGB")` (no
  compositing): transparent pixels show the colour stored under them, often black. Same as the official code;
  flatten onto a background yourself first if that matters.
- CMYK: PIL's naive CMYK->RGB formula (no ICC colour management), as in the official code.
- 16-bit grey (I;16*) and 32-bit integer (I) images: `convert("RGB")` CLIPS values at 255, which turns most
  16-bit images white. DEVIATION (on by default, `rescale_high_bit_depth`): samples are mapped to 8 bits as
  round(v / 257) (the 65535 -> 255 scale) before the conversion. 48-bit RGB PNGs are already reduced to 8 bits
  by PIL when opened, so they match the official code. Float (F) images follow the official clip.
- EXIF orientation: the official code does NOT apply it (PIL never rotates on open or convert), so a phone photo
  stored sideways reaches the model sideways. DEVIATION (on by default, `apply_exif_orientation`): the image is
  rotated upright with `ImageOps.exif_transpose`; switch it off to match the official pixels bit for bit.
- Animated images (GIF, APNG, WebP): the first frame, which is what PIL hands the official code.
- Tiny images, down to 1x1: accepted. The slicer upscales them (BICUBIC) to about 448x448 like the official
  processor, so a 1x1 image becomes a uniform 448x448 image; nothing fails.

Errors (`InvalidInputError`, each naming the file and the fix): missing or zero-byte file, unrecognised format,
truncated or corrupt data (decoding errors surface on `load()`, which is forced here, not later), arrays of the
wrong shape or dtype, and images above the pixel limit.

Decompression bombs: `ImageLoadOptions.max_pixels` (default `MAX_IMAGE_PIXELS`, 64 Mi pixels) is checked against
the header size BEFORE decoding. A larger JPEG is decoded at a reduced DCT scale (1/2, 1/4 or 1/8 via PIL's
`draft`) so it fits under the limit: the slicer shrinks such an image to at most ~9 x 448^2 pixels anyway, so
little is lost (it differs from a full decode + BICUBIC by resampling detail only). Any other format above the
limit is rejected with a message saying to downscale it. PIL itself refuses to open files above twice its own
`Image.MAX_IMAGE_PIXELS` (~179 MP) with `DecompressionBombError`; that is reported the same way.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from edge.errors import InvalidInputError

# Decoded-pixel limit: 64 Mi pixels = 192 MiB as 8-bit RGB, before the slicer's resize copies. Above PIL's own
# warning threshold (89.5 MP) only for JPEGs, which `draft` decodes at a reduced scale.
MAX_IMAGE_PIXELS = 64 * 1024 * 1024
# DCT scale denominators a JPEG decoder supports (libjpeg), smallest reduction first.
JPEG_DRAFT_SCALES = (2, 4, 8)
# 16-bit -> 8-bit: 65535 / 255 = 257 exactly.
_U16_TO_U8 = 257.0
_HIGH_BIT_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")



@dataclass(frozen=True)
class ImageLoadOptions:
    """Attributes:
    max_pixels: most pixels decoded from a file (decompression-bomb guard); see the module docstring.
    apply_exif_orientation: rotate per the EXIF Orientation tag (the official code does not).
    rescale_high_bit_depth: map 16/32-bit integer grey to 8 bits instead of clipping at 255 (official clips).
    """

    max_pixels: int = MAX_IMAGE_PIXELS
    apply_exif_orientation: bool = True
    rescale_high_bit_depth: bool = True


def load_image(source, options: ImageLoadOptions = ImageLoadOptions()) -> Image.Image:
    """Decode `source` to a loaded RGB PIL image (see the module docstring for the conversion policy)."""
    if isinstance(source, np.ndarray):
        return _from_array(source)
    if isinstance(source, Image.Image):
        name = getattr(source, "filename", "") or "PIL image"
        image = _guard_size(source, options, name) if _is_lazy(source) else source
        return _to_rgb(_decode(image, name), options, name)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if not data:
            raise InvalidInputError("image bytes are empty (0 bytes); pass the encoded file content.")
        return _open_and_convert(io.BytesIO(data), options, "image bytes")
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise InvalidInputError(f"image file {path} not found; check the path.")
        if path.stat().st_size == 0:
            raise InvalidInputError(f"image file {path} is empty (0 bytes); re-export or re-download it.")
        with open(path, "rb") as f:
            return _open_and_convert(f, options, str(path))
    raise InvalidInputError(
        f"cannot load an image from {type(source).__name__}; pass a path, encoded bytes, a PIL.Image or an "
        "HxWx3 uint8 numpy array.")


def probe_image(data: bytes) -> tuple[int, int, str]:
    """(W, H, format) from the header of encoded image bytes, without decoding pixels (for cost checks)."""
    if not data:
        raise InvalidInputError("image bytes are empty (0 bytes); pass the encoded file content.")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data)) as image:
                (w, h), fmt = image.size, image.format or ""
        except Image.DecompressionBombError as e:
            raise InvalidInputError(f"image bytes are too large to decode safely ({e}); downscale the image.") from None
        except UnidentifiedImageError:
            raise InvalidInputError(
                "image bytes are not an image format PIL can read (or the file is corrupt); use PNG, JPEG, WebP, "
                "GIF, BMP or TIFF.") from None
        except (OSError, SyntaxError, ValueError) as e:
            raise InvalidInputError(f"image bytes cannot be read: {e}") from None
    if w < 1 or h < 1:
        raise InvalidInputError(f"image bytes have an empty size {w}x{h}.")
    return w, h, fmt


def _from_array(a: np.ndarray) -> Image.Image:
    if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3:
        raise InvalidInputError(
            f"image arrays must be HxWx3 uint8 RGB, got shape {a.shape} dtype {a.dtype}; convert first, e.g. "
            "np.clip(x * 255, 0, 255).astype(np.uint8) for floats in [0, 1], or x[..., :3] to drop alpha "
            "(OpenCV arrays are BGR: use x[..., ::-1]).")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise InvalidInputError(f"image array {a.shape} has no pixels.")
    return Image.fromarray(np.ascontiguousarray(a), mode="RGB")


def _is_lazy(image: Image.Image) -> bool:
    """True for an opened-but-not-decoded file image (its tiles are still pending)."""
    return bool(getattr(image, "tile", None))


def _open_and_convert(fp, options: ImageLoadOptions, name: str) -> Image.Image:
    with warnings.catch_warnings():
        # Our own limit (checked below) replaces PIL's warning between 89.5 and 179 MP.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(fp)
        except Image.DecompressionBombError as e:
            raise InvalidInputError(
                f"{name} is too large to decode safely ({e}). Downscale it (e.g. to under "
                f"{options.max_pixels / 1e6:.0f} MP) before passing it in.") from e
        except UnidentifiedImageError as e:
            raise InvalidInputError(
                f"{name} is not an image format PIL can read (or the file is corrupt); use PNG, JPEG, WebP, "
                "GIF, BMP or TIFF.") from e
        except OSError as e:
            raise InvalidInputError(f"{name} cannot be read: {e}") from e
        image = _guard_size(image, options, name)
        return _to_rgb(_decode(image, name), options, name)


def _guard_size(image: Image.Image, options: ImageLoadOptions, name: str) -> Image.Image:
    """Apply the pixel limit from the header; JPEGs above it are set to decode at a reduced scale."""
    w, h = image.size
    if w < 1 or h < 1:
        raise InvalidInputError(f"{name} has an empty size {w}x{h}.")
    if w * h <= options.max_pixels:
        return image
    if image.format == "JPEG":
        for d in JPEG_DRAFT_SCALES:
            if -(-w // d) * -(-h // d) <= options.max_pixels:
                image.draft(None, (max(1, w // d), max(1, h // d)))
                if image.size[0] * image.size[1] <= options.max_pixels:
                    return image
                break
    raise InvalidInputError(
        f"{name} is {w}x{h} = {w * h / 1e6:.1f} MP, above the {options.max_pixels / 1e6:.1f} MP decoding limit "
        "(decompression-bomb guard). Downscale it first, or raise ImageLoadOptions.max_pixels if you trust "
        "the file and have the memory.")


def _decode(image: Image.Image, name: str) -> Image.Image:
    """Force decoding now so that truncated/corrupt data fails here with a clear message."""
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise InvalidInputError(
            f"{name} is truncated or corrupt ({e}); re-export or re-download the file.") from e
    return image


def _to_rgb(image: Image.Image, options: ImageLoadOptions, name: str) -> Image.Image:
    if options.apply_exif_orientation:
        try:
            image = ImageOps.exif_transpose(image)
        except (OSError, SyntaxError, ValueError, KeyError, TypeError):
            pass  # unreadable EXIF: keep the stored orientation rather than fail on metadata
    if options.rescale_high_bit_depth and image.mode in _HIGH_BIT_DEPTH_MODES:
        a = np.asarray(image).astype(np.float64)
        image = Image.fromarray(np.clip(np.rint(a / _U16_TO_U8), 0, 255).astype(np.uint8), mode="L")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # PIL: "Palette images with Transparency ..." (alpha dropped)
        rgb = image.convert("RGB")
    if rgb.size[0] < 1 or rgb.size[1] < 1:
        raise InvalidInputError(f"{name} decoded to an empty image.")
    return rgb
