"""The CLIP / SigLIP / LLaVA image processors: RGB images -> a `(N, 3, H, W)` float32 tensor.

`ImageProcessor` has exact parity to what `transformers.AutoImageProcessor.from_pretrained(dir)` builds for LLaVA
checkpoints with the PIL backend (`CLIPImageProcessorPil`, `SiglipImageProcessorPil`, `LlavaImageProcessorPil`). Its
config is model/image_config.py's `ImageProcessorConfig`; its RGB conversion is model/image_decode.py's `to_rgb`, where
untrusted bytes become images (`open_image`) and where the deliberate differences from transformers are listed.

Everything here is CPU work meant to run in a worker pool, off the event loop and off the model thread; the
functions keep no state and are safe to call from many threads at once.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .anyres import Layout, tiles
from .idefics3 import SplitLayout
from .image_config import ImageProcessorConfig
from .image_decode import ImageError, to_rgb
from .pan_and_scan import Box
from .qwen2_vision import patchify

logger = logging.getLogger(__name__)

__all__ = [
    "MAX_INTERMEDIATE_PIXELS",
    "ImageProcessor",
]

# Largest intermediate image (in pixels) the processor materializes: the pad-to-square canvas, or the resized
# image before its center crop. Below it the pipeline is bit-for-bit transformers'. Above it (aspect ratios beyond
# ~300:1 for a 336 crop, or pad-to-square of images over ~33 MP) transformers would allocate gigabytes; we resize
# only the window the crop keeps, or shrink before padding, and land within a few uint8 levels of its pixels.
MAX_INTERMEDIATE_PIXELS = 1 << 25


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

    def preprocess_views(self, image: Image.Image, crops: Sequence[Box]) -> list[torch.Tensor]:
        """gemma3's pan and scan: the whole image, then each of its `crops` (model/pan_and_scan.py), each processed
        as one image, as transformers' `Gemma3ImageProcessorPil` (it crops the RGB pixels, then resizes each); one
        `(3, H, W)` float32 tensor per view, each its own (a view of the image is its own engine input)."""
        if self.config.do_convert_rgb:
            image = to_rgb(image)
        return [self.preprocess_one(view) for view in (image, *(image.crop(box) for box in crops))]

    def preprocess_patches(self, image: Image.Image, size: tuple[int, int]) -> torch.Tensor:
        """qwen2_vl: the image resized to `size` (h, w; from `smart_resize`), normalized and cut into patches;
        returns `(h/p * w/p, C * T * p * p)` float32, as transformers' `Qwen2VLImageProcessorPil`."""
        cfg = self.config
        if cfg.do_convert_rgb:
            image = to_rgb(image)
        if cfg.do_resize:
            image = image.resize((size[1], size[0]), cfg.resample)
        pixels = self._normalize(np.asarray(image)[None])[0].numpy()  # (3, h, w), numpy (see patchify)
        return patchify(pixels, cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size)

    def preprocess_tiled(self, image: Image.Image, layout: Layout, tile: int) -> torch.Tensor:
        """llava_next: the whole image then its grid's tiles (model/anyres.py), each processed as one image;
        returns `(1 + rows * cols, 3, H, W)` float32, as transformers' `LlavaNextImageProcessorPil`."""
        cfg = self.config
        if cfg.do_convert_rgb:
            image = to_rgb(image)
        if layout.pad_square:  # LLaVA-OneVision's lone base tile: centred on a square of the mean colour first
            image = self._pad_to_square(image)
        size = cfg.size
        base = (size.height, size.width) if size.height and size.width else (size.shortest_edge, size.shortest_edge)
        if base[0] is None or base[1] is None:
            raise ValueError(f"llava_next needs a square or shortest-edge size, not {size.to_dict()}")
        return self(tiles(image, layout, tile, (base[0], base[1]), cfg.resample))  # (T, 3, H, W)

    def preprocess_split(self, image: Image.Image, layout: SplitLayout) -> torch.Tensor:
        """idefics3: the image resized as `layout` says (model/idefics3.py), cut into its tiles and its global view
        after them; returns `(T, 3, tile, tile)` float32, as transformers' `Idefics3ImageProcessorPil`. All in PIL
        and numpy (uint8 until the value table), never torch ops in the preprocessing thread."""
        cfg = self.config
        if cfg.do_convert_rgb:
            image = to_rgb(image)
        if layout.resized is not None:
            image = image.resize((layout.resized[1], layout.resized[0]), cfg.resample)
        image = image.resize((layout.grid[1], layout.grid[0]), cfg.resample)
        tile = cfg.tile_size
        if not layout.rows:
            return self._normalize(np.asarray(image)[None])  # (1, 3, tile, tile)
        pixels = np.asarray(image)  # (rows * tile, cols * tile, 3)
        tiles = [pixels[r * tile : (r + 1) * tile, c * tile : (c + 1) * tile]
                 for r in range(layout.rows) for c in range(layout.cols)]
        tiles.append(np.asarray(image.resize((tile, tile), cfg.resample)))  # the global view
        return self._normalize(np.stack(tiles))  # (rows * cols + 1, 3, tile, tile)

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
