"""Safe image ingestion and the CLIP / SigLIP / LLaVA image processors.

Two halves:

- `open_image(data, max_pixels=...)`: untrusted bytes -> an RGB `PIL.Image`. The format is sniffed from the content
  (only common photo formats are accepted), the size is read from the header and checked against our own pixel cap
  before anything is decoded, the first frame of an animation is taken, EXIF orientation is applied, and every
  Pillow mode becomes RGB. Every failure is an `ImageError` with a `code`; no Pillow exception escapes.
- `ImageProcessor`: RGB images -> a `(N, 3, H, W)` float32 tensor, with exact parity to what
  `transformers.AutoImageProcessor.from_pretrained(dir)` builds for LLaVA checkpoints with the PIL backend
  (`CLIPImageProcessorPil`, `SiglipImageProcessorPil`, `LlavaImageProcessorPil`).

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
import json
import logging
import math
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from PIL import Image

logger = logging.getLogger(__name__)

__all__ = [
    "ALLOWED_FORMATS",
    "CLIP_MEAN",
    "CLIP_STD",
    "MAX_INTERMEDIATE_PIXELS",
    "SIGLIP_MEAN",
    "SIGLIP_STD",
    "ImageError",
    "ImageErrorCode",
    "ImageProcessor",
    "ImageProcessorConfig",
    "SizeSpec",
    "open_image",
    "to_rgb",
]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)

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

# Largest intermediate image (in pixels) the processor materializes: the pad-to-square canvas, or the resized
# image before its center crop. Below it the pipeline is bit-for-bit transformers'. Above it (aspect ratios beyond
# ~300:1 for a 336 crop, or pad-to-square of images over ~33 MP) transformers would allocate gigabytes; we resize
# only the window the crop keeps, or shrink before padding, and land within a few uint8 levels of its pixels.
MAX_INTERMEDIATE_PIXELS = 1 << 25

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


def _open_entry(name: str) -> tuple[Any, Any] | None:
    """Pillow's (factory, accept) pair for one format, importing its plugin on first use."""
    if name not in Image.OPEN and name in _FORMAT_PLUGINS:
        try:
            importlib.import_module(f"PIL.{_FORMAT_PLUGINS[name]}")
        except ImportError:  # e.g. AVIF support not built into this Pillow
            return None
    return Image.OPEN.get(name)


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
        lo, hi = image.getextrema()
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


# --------------------------------------------------------------------------------------------------------------
# Processor config
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SizeSpec:
    """transformers' `size` dict: exactly one of {height, width}, {shortest_edge[, longest_edge]},
    {max_height, max_width}."""

    height: int | None = None
    width: int | None = None
    shortest_edge: int | None = None
    longest_edge: int | None = None
    max_height: int | None = None
    max_width: int | None = None

    def __post_init__(self) -> None:
        if set(self.to_dict()) not in (
            {"height", "width"},
            {"shortest_edge"},
            {"shortest_edge", "longest_edge"},
            {"max_height", "max_width"},
        ):
            raise ValueError(f"unsupported size specification {self.to_dict()}")

    @classmethod
    def parse(cls, value: Any, *, default_to_square: bool) -> SizeSpec:
        """From a config value: a dict, an int (square or shortest edge), or a (height, width) pair."""
        if isinstance(value, Mapping):
            known = {k: int(v) for k, v in value.items() if v is not None}
            try:
                return cls(**known)
            except TypeError as e:
                raise ValueError(f"unsupported size specification {dict(value)}") from e
        if isinstance(value, int) and not isinstance(value, bool):
            return cls(height=value, width=value) if default_to_square else cls(shortest_edge=value)
        if isinstance(value, list | tuple) and len(value) == 2:
            return cls(height=int(value[0]), width=int(value[1]))
        raise ValueError(f"unsupported size specification {value!r}")

    def to_dict(self) -> dict[str, int]:
        return {k: v for k, v in vars(self).items() if v is not None}

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) an image of (height, width) is resized to, rounded as transformers' PIL backend does."""
        if self.height is not None and self.width is not None:
            return self.height, self.width
        if self.max_height is not None and self.max_width is not None:
            scale = min(self.max_height / height, self.max_width / width)
            return max(1, int(height * scale)), max(1, int(width * scale))
        assert self.shortest_edge is not None
        if self.longest_edge is not None:
            return _shortest_longest_size(height, width, self.shortest_edge, self.longest_edge)
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = self.shortest_edge, int(self.shortest_edge * long / short)  # truncated, not rounded
        return (new_long, new_short) if width <= height else (new_short, new_long)


def _shortest_longest_size(height: int, width: int, shortest: int, longest: int) -> tuple[int, int]:
    """Shortest edge to `shortest` unless that makes the longest edge exceed `longest` (DETR-style rounding)."""
    raw: float | None = None
    low, high = float(min(height, width)), float(max(height, width))
    if high / low * shortest > longest:
        raw = longest * low / high
        shortest = round(raw)
    if (height <= width and height == shortest) or (width <= height and width == shortest):
        return height, width
    if width < height:
        new_h = int(raw * height / width) if raw is not None else int(shortest * height / width)
        return max(1, new_h), max(1, shortest)
    new_w = int(raw * width / height) if raw is not None else int(shortest * width / height)
    return max(1, shortest), max(1, new_w)


ProcessorKind = Literal["clip", "siglip", "llava"]

# transformers' image_processor_type (with any Fast/Pil suffix removed) -> our kind.
_KIND_FOR_TYPE: dict[str, ProcessorKind] = {
    "CLIPImageProcessor": "clip",
    "SiglipImageProcessor": "siglip",
    "LlavaImageProcessor": "llava",
}


@dataclass(frozen=True, kw_only=True)
class ImageProcessorConfig:
    """What the processor does, mirroring transformers' image processor attributes. Sizes are (height, width)."""

    kind: ProcessorKind = "clip"
    do_convert_rgb: bool = True
    do_pad_to_square: bool = False  # LLaVA's `do_pad`: pad with the mean colour before resizing
    do_resize: bool = True
    size: SizeSpec = field(default_factory=lambda: SizeSpec(shortest_edge=224))
    resample: Image.Resampling = Image.Resampling.BICUBIC
    do_center_crop: bool = True
    crop_size: tuple[int, int] | None = (224, 224)
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    do_pad_batch: bool = False  # CLIP/SigLIP `do_pad`: zero-pad normalized images at the bottom/right
    pad_size: tuple[int, int] | None = None  # None: pad to the largest image of the batch

    # Class defaults of each transformers processor, applied where a config file leaves a key out.
    _DEFAULTS: ClassVar[dict[str, dict[str, Any]]] = {
        "clip": {},
        "llava": {},
        "siglip": {
            "size": SizeSpec(height=224, width=224),
            "do_center_crop": False,
            "crop_size": None,
            "image_mean": SIGLIP_MEAN,
            "image_std": SIGLIP_STD,
        },
    }

    def __post_init__(self) -> None:
        object.__setattr__(self, "resample", Image.Resampling(int(self.resample)))
        if self.do_center_crop and self.crop_size is None:
            raise ValueError("do_center_crop is set but crop_size is missing")
        for name in ("image_mean", "image_std"):
            if len(getattr(self, name)) != 3:
                raise ValueError(f"{name} must have 3 values, got {getattr(self, name)}")
        if any(s == 0 for s in self.image_std):
            raise ValueError(f"image_std must not contain 0, got {self.image_std}")

    @classmethod
    def clip(cls, image_size: int, **overrides: Any) -> ImageProcessorConfig:
        """A CLIP processor for a square encoder input (shortest edge, center crop, OpenAI CLIP mean/std)."""
        base: dict[str, Any] = {"size": SizeSpec(shortest_edge=image_size), "crop_size": (image_size, image_size)}
        return cls(**{**base, **overrides})

    @classmethod
    def siglip(cls, image_size: int, **overrides: Any) -> ImageProcessorConfig:
        """A SigLIP processor: resize to image_size x image_size, no crop, mean/std 0.5."""
        base = {**cls._DEFAULTS["siglip"], "kind": "siglip", "size": SizeSpec(height=image_size, width=image_size)}
        return cls(**{**base, **overrides})

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> ImageProcessorConfig:
        """From a transformers image processor dict (preprocessor_config.json, or processor_config.json's
        `image_processor`); keys left out or null take that processor class's defaults."""
        kind = _kind_of(config)
        d = {k: v for k, v in config.items() if v is not None}
        values: dict[str, Any] = {"kind": kind, **cls._DEFAULTS[kind]}
        for key in ("do_convert_rgb", "do_resize", "do_center_crop", "do_rescale", "do_normalize"):
            if key in d:
                values[key] = bool(d[key])
        if "size" in d:
            values["size"] = SizeSpec.parse(d["size"], default_to_square=bool(d.get("default_to_square", False)))
        if "crop_size" in d:
            crop = SizeSpec.parse(d["crop_size"], default_to_square=True)
            if crop.height is None or crop.width is None:
                raise ValueError(f"crop_size must give height and width, got {d['crop_size']}")
            values["crop_size"] = (crop.height, crop.width)
        if "resample" in d:
            values["resample"] = Image.Resampling(int(d["resample"]))
        if "rescale_factor" in d:
            values["rescale_factor"] = float(d["rescale_factor"])
        for key in ("image_mean", "image_std"):
            if key in d:
                values[key] = _three_floats(d[key], key)
        if d.get("do_pad"):
            if kind == "llava":
                values["do_pad_to_square"] = True
            else:
                values["do_pad_batch"] = True
                if "pad_size" in d:
                    pad = SizeSpec.parse(d["pad_size"], default_to_square=True)
                    if pad.height is None or pad.width is None:
                        raise ValueError(f"pad_size must give height and width, got {d['pad_size']}")
                    values["pad_size"] = (pad.height, pad.width)
        return cls(**values)

    @property
    def output_hw(self) -> tuple[int, int] | None:
        """(H, W) of every processed image when it does not depend on the input, else None."""
        if self.do_pad_batch and self.pad_size is not None:
            return self.pad_size
        if self.do_center_crop:
            return self.crop_size
        if self.do_resize and self.size.height is not None and self.size.width is not None:
            return self.size.height, self.size.width
        if self.do_resize and self.do_pad_to_square and self.size.shortest_edge and not self.size.longest_edge:
            return self.size.shortest_edge, self.size.shortest_edge
        return None


def _kind_of(config: Mapping[str, Any]) -> ProcessorKind:
    type_name = config.get("image_processor_type")
    if type_name:
        base = type_name.removesuffix("Fast").removesuffix("Pil")
        if base not in _KIND_FOR_TYPE:
            raise ValueError(
                f"unsupported image processor type {type_name!r}; supported: {', '.join(sorted(_KIND_FOR_TYPE))}"
            )
        return _KIND_FOR_TYPE[base]
    size = config.get("size")
    square = isinstance(size, Mapping) and "height" in size and "crop_size" not in config
    kind: ProcessorKind = "siglip" if square else "clip"
    logger.info("image processor config has no image_processor_type; treating it as %s", kind)
    return kind


def _three_floats(value: Any, name: str) -> tuple[float, float, float]:
    if isinstance(value, int | float):
        return (float(value),) * 3
    values = tuple(float(v) for v in value)
    if len(values) != 3:
        raise ValueError(f"{name} must have 3 values, got {value}")
    return values  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------------------------
# Processor
# --------------------------------------------------------------------------------------------------------------

_PROCESSOR_FILE = "processor_config.json"
_PREPROCESSOR_FILE = "preprocessor_config.json"


class ImageProcessor:
    """RGB images -> normalized `(N, 3, H, W)` float32 pixels, exactly as transformers' PIL-backend processors.

    Steps, each switched by the config: convert to RGB, pad to square with the mean colour (LLaVA), resize (PIL, on
    uint8 RGB), center crop (zero padding where the image is smaller), rescale, normalize, pad the batch.
    """

    def __init__(self, config: ImageProcessorConfig) -> None:
        self.config = config
        self._lut = _value_table(config)  # (3, 256) float32: every uint8 value's final float, per channel

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ImageProcessor:
        """From a checkpoint directory: processor_config.json's `image_processor`, else preprocessor_config.json,
        else (with a warning) a default CLIP/SigLIP processor built from config.json's vision config."""
        path = Path(path)
        nested = _read_json(path / _PROCESSOR_FILE)
        if nested is not None and isinstance(nested.get("image_processor"), Mapping):
            return cls(ImageProcessorConfig.from_dict(nested["image_processor"]))
        flat = _read_json(path / _PREPROCESSOR_FILE)
        if flat is not None:
            return cls(ImageProcessorConfig.from_dict(flat))
        model_config = _read_json(path / "config.json")
        if model_config is None:
            raise FileNotFoundError(f"no {_PROCESSOR_FILE}, {_PREPROCESSOR_FILE} or config.json in {path}")
        vision = model_config.get("vision_config", model_config)
        model_type = str(vision.get("model_type", ""))
        image_size = int(vision.get("image_size", 224))
        logger.warning(
            "%s has no image processor config; using %s defaults for image_size=%d",
            path,
            "SigLIP" if "siglip" in model_type else "CLIP",
            image_size,
        )
        return cls.for_vision_model(model_type, image_size)

    @classmethod
    def for_vision_model(cls, model_type: str, image_size: int) -> ImageProcessor:
        """Default processor for an encoder: SigLIP when `model_type` names it, else CLIP."""
        if "siglip" in model_type:
            return cls(ImageProcessorConfig.siglip(image_size))
        return cls(ImageProcessorConfig.clip(image_size))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"

    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Process a batch; returns `(N, 3, H, W)` float32. Images must come out the same size unless the config
        pads the batch."""
        if not images:
            raise ValueError("no images to process")
        arrays = [self._to_uint8(image) for image in images]  # each (H, W, 3) uint8
        if all(a.shape == arrays[0].shape for a in arrays) and not self._needs_batch_pad(arrays):
            return self._normalize(np.stack(arrays))  # (N, 3, H, W)
        if not self.config.do_pad_batch:
            shapes = sorted({a.shape[:2] for a in arrays})
            raise ValueError(f"images of different sizes {shapes} cannot form a batch (resize/crop are off)")
        height, width = self.config.pad_size or (max(a.shape[0] for a in arrays), max(a.shape[1] for a in arrays))
        out = torch.zeros(len(arrays), 3, height, width)  # (N, 3, H, W)
        for i, a in enumerate(arrays):
            if a.shape[0] > height or a.shape[1] > width:
                raise ValueError(f"image of size {a.shape[:2]} is larger than pad_size {(height, width)}")
            out[i, :, : a.shape[0], : a.shape[1]] = self._normalize(a[None])[0]
        return out

    def preprocess_one(self, image: Image.Image) -> torch.Tensor:
        """Process one image; returns `(3, H, W)` float32."""
        return self([image])[0]

    # -- steps -----------------------------------------------------------------------------------------------

    def _needs_batch_pad(self, arrays: list[np.ndarray]) -> bool:
        pad = self.config.pad_size
        return self.config.do_pad_batch and pad is not None and arrays[0].shape[:2] != tuple(pad)

    def _to_uint8(self, image: Image.Image) -> np.ndarray:
        """Everything before rescale, on uint8 RGB: convert, pad to square, resize, crop. Returns (H, W, 3)."""
        cfg = self.config
        if cfg.do_convert_rgb:
            image = to_rgb(image)
        elif image.mode != "RGB":
            raise ImageError(
                f"expected an RGB image (do_convert_rgb is off), got mode {image.mode}", code="unsupported_image"
            )
        if cfg.do_pad_to_square:
            image = self._pad_to_square(image)
        if not cfg.do_resize:
            pixels = np.asarray(image)  # (H, W, 3)
            return _center_crop(pixels, cfg.crop_size) if cfg.do_center_crop and cfg.crop_size else pixels
        out_h, out_w = cfg.size.output_size(image.height, image.width)
        if cfg.do_center_crop and cfg.crop_size:
            return self._resize_and_crop(image, (out_h, out_w), cfg.crop_size)
        if out_h * out_w > MAX_INTERMEDIATE_PIXELS:
            raise ImageError(
                f"a {image.width}x{image.height} image would resize to {out_w}x{out_h}; aspect ratio too extreme",
                code="unsupported_image",
            )
        return np.asarray(image.resize((out_w, out_h), cfg.resample))  # (H', W', 3)

    def _pad_to_square(self, image: Image.Image) -> Image.Image:
        """Center the image on a square canvas of the mean colour (uint8, truncated as transformers does)."""
        width, height = image.size
        if width == height:
            return image
        side = max(width, height)
        if side * side > MAX_INTERMEDIATE_PIXELS:
            factor = math.ceil(side / math.isqrt(MAX_INTERMEDIATE_PIXELS))
            logger.debug("pre-shrinking a %dx%d image by %d before padding it to a square", width, height, factor)
            image = image.reduce(factor)
            width, height = image.size
            side = max(width, height)
        fill = tuple(int(m * 255) for m in self.config.image_mean)
        canvas = Image.new("RGB", (side, side), fill)
        canvas.paste(image, ((side - width) // 2, (side - height) // 2))
        return canvas

    def _resize_and_crop(self, image: Image.Image, out_hw: tuple[int, int], crop_hw: tuple[int, int]) -> np.ndarray:
        """Resize to out_hw then center crop to crop_hw; returns (crop_h, crop_w, 3) uint8."""
        out_h, out_w = out_hw
        resample = self.config.resample
        if out_h * out_w <= MAX_INTERMEDIATE_PIXELS:
            resized = np.asarray(image.resize((out_w, out_h), resample))  # (H', W', 3)
            return _center_crop(resized, crop_hw)
        # Extreme aspect ratio: resize only the window the crop keeps (Pillow's `box`), never the whole image.
        # Not bit-exact: Pillow rounds the box to float32 and may order its two passes differently.
        src_y, dst_y, len_y = _crop_window(out_h, crop_hw[0])
        src_x, dst_x, len_x = _crop_window(out_w, crop_hw[1])
        sx, sy = image.width / out_w, image.height / out_h
        box = (src_x * sx, src_y * sy, (src_x + len_x) * sx, (src_y + len_y) * sy)
        window = np.asarray(image.resize((len_x, len_y), resample, box=box))  # (len_y, len_x, 3)
        out = np.zeros((*crop_hw, 3), dtype=np.uint8)  # (crop_h, crop_w, 3)
        out[dst_y : dst_y + len_y, dst_x : dst_x + len_x] = window
        return out

    def _normalize(self, batch: np.ndarray) -> torch.Tensor:
        """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 through the per-channel value table."""
        n, height, width, _ = batch.shape
        out = np.empty((n, 3, height, width), dtype=np.float32)  # (N, 3, H, W)
        for c in range(3):
            out[:, c] = self._lut[c][batch[..., c]]  # (N, H, W) table lookup
        return torch.from_numpy(out)


def _value_table(config: ImageProcessorConfig) -> np.ndarray:
    """(3, 256) float32: rescale then normalize of every uint8 value, with transformers' exact dtypes
    (rescale in float64 then cast to float32; normalize in float32), so a lookup is bit-identical to computing."""
    values = np.arange(256, dtype=np.float64)
    values = (values * config.rescale_factor if config.do_rescale else values).astype(np.float32)
    table = np.repeat(values[None, :], 3, axis=0)  # (3, 256)
    if config.do_normalize:
        mean = np.asarray(config.image_mean, dtype=np.float32)[:, None]  # (3, 1)
        std = np.asarray(config.image_std, dtype=np.float32)[:, None]  # (3, 1)
        table = (table - mean) / std
    return np.ascontiguousarray(table, dtype=np.float32)


def _crop_window(size: int, crop: int) -> tuple[int, int, int]:
    """One axis of a center crop: (source start, destination start, length). A source smaller than the crop is
    centred in it (the extra pixel of an odd margin goes before it), as transformers pads."""
    if size >= crop:
        return (size - crop) // 2, 0, crop
    return 0, (crop - size + 1) // 2, size


def _center_crop(pixels: np.ndarray, crop_hw: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) -> (crop_h, crop_w, 3), zero-padded where the image is smaller than the crop."""
    src_y, dst_y, len_y = _crop_window(pixels.shape[0], crop_hw[0])
    src_x, dst_x, len_x = _crop_window(pixels.shape[1], crop_hw[1])
    window = pixels[src_y : src_y + len_y, src_x : src_x + len_x]
    if (len_y, len_x) == crop_hw:
        return window
    out = np.zeros((*crop_hw, 3), dtype=pixels.dtype)  # (crop_h, crop_w, 3)
    out[dst_y : dst_y + len_y, dst_x : dst_x + len_x] = window
    return out


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    with path.open(encoding="utf-8") as f:
        return json.load(f)
