"""Image processor config: what an image processor does, read from a checkpoint's transformers config.

`ImageProcessorConfig` mirrors the attributes of transformers' CLIP / SigLIP / LLaVA image processors and is built
from their config dicts (preprocessor_config.json, or processor_config.json's `image_processor`), keys left out taking
each processor class's defaults; `SizeSpec` is transformers' `size` dict, with the output size its PIL backend
computes.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from PIL import Image

from .pan_and_scan import PanAndScan

logger = logging.getLogger(__name__)

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "SIGLIP_MEAN",
    "SIGLIP_STD",
    "ImageProcessorConfig",
    "SizeSpec",
]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)


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


ProcessorKind = Literal["clip", "siglip", "llava", "llava_next", "llava_onevision", "qwen2_vl", "idefics3", "gemma3"]

# transformers' image_processor_type (with any Fast/Pil suffix removed) -> our kind.
_KIND_FOR_TYPE: dict[str, ProcessorKind] = {
    "CLIPImageProcessor": "clip",
    "SiglipImageProcessor": "siglip",
    "LlavaImageProcessor": "llava",
    "LlavaNextImageProcessor": "llava_next",  # each tile as CLIP's; the tiling is model/anyres.py's
    "LlavaOnevisionImageProcessor": "llava_onevision",  # the same, SigLIP-style square tiles
    "Qwen2VLImageProcessor": "qwen2_vl",  # a resize to multiples of patch * merge within a pixel budget, patches
    "Idefics3ImageProcessor": "idefics3",  # a longest-edge resize, then tiles (model/idefics3.py)
    "Gemma3ImageProcessor": "gemma3",  # SigLIP's square resize, bilinear; pan and scan (model/pan_and_scan.py)
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
    # qwen2_vl: its `size` is a pixel budget (shortest_edge = min_pixels, longest_edge = max_pixels), the patching
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    # idefics3: `size` {longest_edge} (None: no first resize), `max_image_size` {longest_edge} (the tile), splitting
    longest_edge: int | None = 4 * 364
    tile_size: int = 364
    do_image_splitting: bool = True
    # gemma3: pan and scan (crops of a long image, each a view of its own), and its settings where it is on
    do_pan_and_scan: bool = False
    pan_and_scan: PanAndScan = field(default_factory=PanAndScan)

    # Class defaults of each transformers processor, applied where a config file leaves a key out.
    _DEFAULTS: ClassVar[dict[str, dict[str, Any]]] = {
        "clip": {},
        "llava": {},
        "llava_next": {},
        "llava_onevision": {"size": SizeSpec(height=384, width=384), "do_center_crop": False, "crop_size": None},
        "qwen2_vl": {"do_center_crop": False, "crop_size": None},
        "gemma3": {"size": SizeSpec(height=224, width=224), "do_center_crop": False, "crop_size": None,
                   "resample": Image.Resampling.BILINEAR, "image_mean": SIGLIP_MEAN, "image_std": SIGLIP_STD},
        "idefics3": {"do_center_crop": False, "crop_size": None, "resample": Image.Resampling.LANCZOS,
                     "image_mean": SIGLIP_MEAN, "image_std": SIGLIP_STD},
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
        if kind == "qwen2_vl":
            size = d.get("size") or {}
            values["min_pixels"] = int(d.get("min_pixels", size.get("shortest_edge", cls.min_pixels)))
            values["max_pixels"] = int(d.get("max_pixels", size.get("longest_edge", cls.max_pixels)))
            for key in ("patch_size", "temporal_patch_size", "merge_size"):
                if key in d:
                    values[key] = int(d[key])
        elif kind == "idefics3":
            values.update(_idefics3_values(d))
        elif "size" in d:
            values["size"] = SizeSpec.parse(d["size"], default_to_square=bool(d.get("default_to_square", False)))
        if kind == "gemma3":
            values.update(_gemma3_values(d))
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
        if d.get("do_pad") and kind not in ("llava_next", "llava_onevision", "idefics3"):  # theirs: a batch axis
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


def _idefics3_values(d: Mapping[str, Any]) -> dict[str, Any]:
    """Idefics3's own keys: `size` and `max_image_size` are {longest_edge} dicts (or {height, width} squares)."""
    def edge(value: Any, name: str) -> int:
        if isinstance(value, Mapping) and "longest_edge" in value:
            return int(value["longest_edge"])
        if isinstance(value, Mapping) and value.get("height") == value.get("width") and "height" in value:
            return int(value["height"])
        raise ValueError(f"idefics3's {name} must be {{'longest_edge': N}}, got {value!r}")

    out: dict[str, Any] = {"do_image_splitting": bool(d.get("do_image_splitting", True))}
    if "size" in d:
        out["longest_edge"] = edge(d["size"], "size")
    if "max_image_size" in d:
        out["tile_size"] = edge(d["max_image_size"], "max_image_size")
    if d.get("do_resize") is False:
        out["longest_edge"] = None
    return out


def _gemma3_values(d: Mapping[str, Any]) -> dict[str, Any]:
    """Gemma 3's pan-and-scan keys; null ones take `Gemma3Processor`'s defaults (off, 256 px, 4 crops, 1.2), as
    that processor passes them."""
    default = PanAndScan()
    settings = PanAndScan(
        min_crop_size=int(d.get("pan_and_scan_min_crop_size", default.min_crop_size)),
        max_crops=int(d.get("pan_and_scan_max_num_crops", default.max_crops)),
        min_ratio=float(d.get("pan_and_scan_min_ratio_to_activate", default.min_ratio)),
    )
    return {"do_pan_and_scan": bool(d.get("do_pan_and_scan", False)), "pan_and_scan": settings}


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
