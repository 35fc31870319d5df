"""Gemma 3's pan and scan: the crops an image is cut into, and the prompt text an image with crops becomes, as
transformers' `Gemma3ImageProcessorPil.pan_and_scan` and `Gemma3Processor.replace_image_token` do.

An image whose aspect ratio reaches `min_ratio` is cut along its long side into 2..`max_crops` crops (about one per
unit of aspect ratio, none narrower than `min_crop_size`); each crop, like the whole image before it, is resized to
the processor's square view and becomes its own run of visual tokens. In the prompt the image is then

    Here is the original image \\n\\n<boi><soft>*N<eoi>\\n\\n and here are some crops to help you see better
    \\n\\n<boi><soft>*N<eoi>\\n\\n \\n\\n<boi><soft>*N<eoi>\\n\\n ...

(one line in the prompt: the text, then the crops' sequences joined by a space), and an image without crops only
its own `\\n\\n<boi><soft>*N<eoi>\\n\\n`.

Pure functions of sizes, no pixels here (model/images.py crops them): the server plans an image from its header
size before decoding it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

Box = tuple[int, int, int, int]  # (left, top, right, bottom) in pixels, as PIL's `Image.crop` takes it


@dataclass(frozen=True)
class PanAndScan:
    """transformers' pan-and-scan settings (`pan_and_scan_min_crop_size`, `pan_and_scan_max_num_crops`,
    `pan_and_scan_min_ratio_to_activate`); the defaults are `Gemma3Processor`'s, which it passes where a checkpoint
    leaves them null."""

    min_crop_size: int = 256
    max_crops: int = 4
    min_ratio: float = 1.2

    def __post_init__(self) -> None:
        if self.min_crop_size < 1 or self.max_crops < 1:
            raise ValueError(f"pan and scan needs a positive min_crop_size and max_num_crops, got {self}")

    def boxes(self, height: int, width: int) -> tuple[Box, ...]:
        """The crops of a (height, width) image, in transformers' order (row by row); () when pan and scan does not
        activate. Boxes past the image's edge are cut at it (the last crop may be narrower), as numpy slicing is."""
        long, short = (width, height) if width >= height else (height, width)
        if long / short < self.min_ratio:
            return ()
        n = math.floor(long / short + 0.5)  # half rounded up
        n = min(math.floor(long / self.min_crop_size), n)
        n = min(self.max_crops, max(2, n))
        cols, rows = (n, 1) if width >= height else (1, n)
        crop_w, crop_h = math.ceil(width / cols), math.ceil(height / rows)
        if min(crop_w, crop_h) < self.min_crop_size:
            return ()
        if (cols - 1) * crop_w >= width or (rows - 1) * crop_h >= height:  # min_crop_size < max_crops - 1 only
            raise ValueError(f"pan and scan would cut an empty crop from a {width}x{height} image ({self})")
        return tuple((x, y, min(x + crop_w, width), min(y + crop_h, height))
                     for y in range(0, crop_h * rows, crop_h) for x in range(0, crop_w * cols, crop_w))


def image_text(boi: str, image_token: str, eoi: str, crops: int) -> str:
    """The prompt text of one image with `crops` crops (`Gemma3Processor.replace_image_token`), each view's slots as
    one `image_token` (the tokenizer expands it)."""
    view = f"\n\n{boi}{image_token}{eoi}\n\n"
    if not crops:
        return view
    return (f"Here is the original image {view} and here are some crops to help you see better "
            + " ".join([view] * crops))
