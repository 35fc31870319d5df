"""Safe image ingestion: untrusted bytes -> an RGB `PIL.Image`, or an `ImageError`.

`open_image(data, max_pixels=...)` sniffs the format from the content (only common photo formats are accepted), reads
the size from the header and checks it against our own pixel cap before anything is decoded, takes the first frame of
an animation, applies EXIF orientation, and turns every Pillow mode into RGB (`to_rgb`, which the image processor
uses too). Every failure is an `ImageError` with a `code`; no Pillow exception escapes.

Deliberate differences from transformers (both are about what the pixels mean, not about the processing):

- EXIF orientation is applied (transformers ignores it, so a phone photo reaches the model sideways).
- 16-bit grayscale (`I;16*`, and `I` holding values above 255) is scaled to 8 bits, `round(v / 257)`, instead of
  being clipped at 255 (which turns almost every 16-bit image white).

Everything here is CPU work meant to run in a worker pool, off the event loop and off the model thread; the
functions keep no state and are safe to call from many threads at once.
"""

from __future__ import annotations

import importlib
import io
import logging
import struct
from collections.abc import Callable, Iterable
from typing import IO, Literal, cast

import numpy as np
from PIL import Image, ImageFile

logger = logging.getLogger(__name__)

__all__ = [
    "ALLOWED_FORMATS",
    "ImageError",
    "ImageErrorCode",
    "open_image",
    "to_rgb",
]

# Formats we are willing to parse from untrusted bytes, tried in this order. Pillow knows ~40 more (EPS, which
# shells out to Ghostscript, PSD, FITS, ...); none of them is a format a chat client sends.
ALLOWED_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "MPO", "GIF", "WEBP", "BMP", "TIFF", "AVIF")
_FORMAT_PLUGINS = {
    "PNG": "PngImagePlugin",
    "JPEG": "JpegImagePlugin",
    "MPO": "MpoImagePlugin",
    "GIF": "GifImagePlugin",
    "WEBP": "WebPImagePlugin",
    "BMP": "BmpImagePlugin",
    "TIFF": "TiffImagePlugin",
    "AVIF": "AvifImagePlugin",
}

_EXIF_ORIENTATION_TAG = 0x0112
_TRANSPOSE_FOR_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SWAPS_AXES = frozenset({5, 6, 7, 8})  # orientations that turn the image a quarter
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})

ImageErrorCode = Literal["invalid_image", "unsupported_image", "image_too_large", "image_too_many_pixels"]


class ImageError(ValueError):
    """An image we refuse; `code` says why, `status_code` is the HTTP status it maps to (413 or 400)."""

    def __init__(self, message: str, *, code: ImageErrorCode = "invalid_image") -> None:
        super().__init__(message)
        self.code: ImageErrorCode = code

    @property
    def status_code(self) -> int:
        return 413 if self.code == "image_too_large" else 400


# --------------------------------------------------------------------------------------------------------------
# Ingestion: bytes -> RGB PIL image
# --------------------------------------------------------------------------------------------------------------


def open_image(
    data: bytes | bytearray | memoryview,
    *,
    max_pixels: int,
    max_bytes: int | None = None,
    formats: Iterable[str] = ALLOWED_FORMATS,
) -> Image.Image:
    """Decode untrusted image bytes into an RGB image, refusing bombs from the header before decoding."""
    image = _checked_header(data, max_pixels=max_pixels, max_bytes=max_bytes, formats=formats)
    try:
        image.load()  # first frame only; later frames of an animation are never read
    except Image.DecompressionBombError as e:
        raise ImageError(f"image frame too large: {e}", code="image_too_many_pixels") from e
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, struct.error, EOFError, ...
        raise ImageError(f"cannot decode {image.format} image: {e}", code="invalid_image") from e
    if image.width * image.height > max_pixels:  # a decoder that changed its mind about the size
        raise ImageError(f"decoded image is {image.width}x{image.height} pixels", code="image_too_many_pixels")

    orientation = _exif_orientation(image)
    rgb = to_rgb(image)
    if orientation in _TRANSPOSE_FOR_ORIENTATION:
        rgb = rgb.transpose(_TRANSPOSE_FOR_ORIENTATION[orientation])
    return rgb


def image_size(
    data: bytes | bytearray | memoryview,
    *,
    max_pixels: int,
    max_bytes: int | None = None,
    formats: Iterable[str] = ALLOWED_FORMATS,
) -> tuple[int, int]:
    """(height, width) that `open_image` will return for `data` (EXIF orientation applied), from the header only:
    nothing is decoded. The same refusals as `open_image` before its decoding. (An orientation Pillow reads only
    while decoding, a PNG's eXIf chunk after its pixels, is not seen here: the count then follows the header.)"""
    image = _checked_header(data, max_pixels=max_pixels, max_bytes=max_bytes, formats=formats)
    width, height = image.size
    if _header_orientation(image) in _SWAPS_AXES:
        return width, height
    return height, width


def _checked_header(data: bytes | bytearray | memoryview, *, max_pixels: int, max_bytes: int | None,
                    formats: Iterable[str]) -> Image.Image:
    """The lazily opened image (header read, nothing decoded) once the byte cap, the format and the header's size
    pass: what `open_image` and `image_size` both refuse first."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"image data must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if not data:
        raise ImageError("empty image data", code="invalid_image")
    if max_bytes is not None and len(data) > max_bytes:
        raise ImageError(f"image is {len(data)} bytes, over the limit of {max_bytes}", code="image_too_large")
    image = _identify(data, formats)  # header only: nothing decoded yet
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ImageError(f"image has an empty size ({width}x{height})", code="invalid_image")
    if width * height > max_pixels:
        raise ImageError(
            f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}",
            code="image_too_many_pixels",
        )
    return image


def _identify(data: bytes, formats: Iterable[str]) -> Image.Image:
    """Open `data` lazily with the first allowed format plugin that accepts it (Pillow's bomb check not involved)."""
    prefix = data[:16]
    fp = io.BytesIO(data)
    for name in formats:
        entry = _open_entry(name.upper())
        if entry is None:
            continue
        factory, accept = entry
        result = accept(prefix) if accept is not None else True
        if isinstance(result, str) or not result:  # a str is Pillow's "looks like it, but unsupported here"
            continue
        fp.seek(0)
        try:
            return factory(fp, "")
        except Image.DecompressionBombError as e:  # a plugin checking a sub-image (GIF frame, MPO part) itself
            raise ImageError(f"image too large: {e}", code="image_too_many_pixels") from e
        except (SyntaxError, IndexError, TypeError, struct.error) as e:  # "not really this format": try the next
            logger.debug("%s plugin refused the data: %s", name, e)
        except Exception as e:
            raise ImageError(f"cannot read {name} image header: {e}", code="invalid_image") from e
    raise ImageError("unrecognized or unsupported image format", code="invalid_image")


# Pillow's registry entry of a format: the plugin's opener, and its header check (None: accepts anything)
_OpenEntry = tuple[Callable[[IO[bytes], str | bytes], ImageFile.ImageFile], Callable[[bytes], bool | str] | None]


def _open_entry(name: str) -> _OpenEntry | None:
    """Pillow's (factory, accept) pair for one format, importing its plugin on first use."""
    if name not in Image.OPEN and name in _FORMAT_PLUGINS:
        try:
            importlib.import_module(f"PIL.{_FORMAT_PLUGINS[name]}")
        except ImportError:  # e.g. AVIF support not built into this Pillow
            return None
    return Image.OPEN.get(name)


def _header_orientation(image: Image.Image) -> int:
    """The EXIF orientation known without decoding: Pillow's PNG `getexif` decodes the whole image to look for an
    eXIf chunk after the pixels (the PNG spec puts it before them), so a PNG's comes from the chunks read so far."""
    if image.format == "PNG" and "exif" not in image.info:
        return 1
    return _exif_orientation(image)


def _exif_orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(_EXIF_ORIENTATION_TAG, 1))
    except Exception:  # malformed EXIF is common and not worth refusing the image for
        logger.debug("ignoring unreadable EXIF data", exc_info=True)
        return 1


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB, as transformers' `convert_to_rgb` does (transparency composited on white).

    Differences: 16-bit grayscale is scaled to 8 bits instead of clipped, and modes transformers cannot convert
    (premultiplied `La`) are handled. Returns `image` itself when it already is plain RGB.
    """
    mode = image.mode
    try:
        if mode in _SIXTEEN_BIT_MODES or mode == "I":
            image = _wide_gray_to_8bit(image)
        elif mode == "La":
            image = image.convert("LA")
        has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
        if not has_alpha:
            return image if image.mode == "RGB" else image.convert("RGB")
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    except Exception as e:
        raise ImageError(f"cannot convert an image of mode {mode} to RGB: {e}", code="unsupported_image") from e


def _wide_gray_to_8bit(image: Image.Image) -> Image.Image:
    """16/32-bit integer grayscale -> 8-bit L (or LA when a transparent value is set).

    `I;16*` is scaled by 1/257 (65535 -> 255, 257*k -> k). Mode `I` is ambiguous: values within 0..255 are left to
    Pillow (same result as transformers), values within 0..65535 are taken as 16-bit, anything wider is scaled to
    its own maximum (negative values clipped to 0).
    """
    if image.mode == "I":
        lo, hi = cast(tuple[float, float], image.getextrema())  # one band: (min, max)
        if lo >= 0 and hi <= 255:
            return image
        full_scale = 65535 if lo >= 0 and hi <= 65535 else max(int(hi), 1)
    else:
        full_scale = 65535
    values = np.asarray(image).astype(np.int64)  # (H, W)
    gray = (np.clip(values, 0, full_scale) * 255 + full_scale // 2) // full_scale  # round(v * 255 / full_scale)
    gray_image = Image.fromarray(gray.astype(np.uint8), mode="L")
    transparency = image.info.get("transparency")
    if isinstance(transparency, int):
        alpha = np.where(values == transparency, 0, 255).astype(np.uint8)  # (H, W)
        return Image.merge("LA", (gray_image, Image.fromarray(alpha, mode="L")))
    return gray_image
