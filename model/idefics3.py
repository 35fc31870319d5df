"""Idefics3's image splitting (SmolVLM uses it): the sizes an image is resized to, its grid of tiles, and the token
layout each image becomes in the prompt, as transformers' `Idefics3ImageProcessorPil` and `Idefics3Processor` do.

An image is resized (PIL, uint8) so that its longest edge is `longest_edge` (the other edge rounded up to even), then
again to multiples of the tile size `tile`; past one tile it is cut into `rows x cols` tiles of `tile x tile`, and a
global view (the whole image resized to one tile) follows them. Every tile becomes `seq_len` visual tokens through
the vision tower and the pixel shuffle; in the prompt each image is

    <fake><row_1_col_1><image>*seq_len<fake><row_1_col_2><image>*seq_len ... \\n   (one line per row)
    \\n<fake><global-img><image>*seq_len<fake>

and an image of one tile is only the last line (without its leading newline). The tags are text the tokenizer
tokenizes; only the `<image>` slots take visual tokens.

Pure functions of sizes, no pixels here (model/images.py cuts the tiles): the server plans an image from its header
size before decoding it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

MAX_IMAGE_SIZE = 4096  # transformers' absolute cap on either edge after the first resize

FAKE_TOKEN = "<fake_token_around_image>"
GLOBAL_TAG = "<global-img>"


@dataclass(frozen=True)
class SplitLayout:
    """How one image is cut: the size of its first resize (None: not resized), the size of its second (multiples of
    the tile), and its grid of tiles (0 x 0: the image is one tile, no global view)."""

    resized: tuple[int, int] | None  # (h, w) after the longest-edge resize
    grid: tuple[int, int]  # (h, w) after the resize to multiples of the tile (or to one tile)
    rows: int
    cols: int

    @property
    def num_tiles(self) -> int:
        """Tiles through the encoder: rows x cols and the global view, or the one tile."""
        return self.rows * self.cols + 1 if self.rows else 1


def _longest_edge_size(height: int, width: int, longest: int) -> tuple[int, int]:
    """transformers' `_resize_output_size_rescale_to_max_len` then `_resize_output_size_scale_below_upper_bound`."""
    aspect = width / height
    if width >= height:
        width, height = longest, int(longest / aspect)
        height += height % 2
    else:
        height, width = longest, int(longest * aspect)
        width += width % 2
    height, width = max(height, 1), max(width, 1)
    aspect = width / height
    if width >= height and width > MAX_IMAGE_SIZE:
        width, height = MAX_IMAGE_SIZE, int(MAX_IMAGE_SIZE / aspect)
    elif height > width and height > MAX_IMAGE_SIZE:
        height, width = MAX_IMAGE_SIZE, int(MAX_IMAGE_SIZE * aspect)
    return max(height, 1), max(width, 1)


def _tile_multiple_size(height: int, width: int, tile: int) -> tuple[int, int]:
    """transformers' `resize_for_vision_encoder`: both edges up to multiples of the tile, the short one from the
    long one's new size and the aspect ratio."""
    aspect = width / height
    if width >= height:
        width = math.ceil(width / tile) * tile
        height = math.ceil(int(width / aspect) / tile) * tile
    else:
        height = math.ceil(height / tile) * tile
        width = math.ceil(int(height * aspect) / tile) * tile
    return height, width


def split_layout(height: int, width: int, *, tile: int, longest_edge: int | None, splitting: bool) -> SplitLayout:
    """The layout of a (height, width) image: `longest_edge` None means the processor does not resize first;
    `splitting` False makes the image one tile whatever its size (`do_image_splitting`)."""
    resized = _longest_edge_size(height, width, longest_edge) if longest_edge is not None else None
    h, w = resized or (height, width)
    if not splitting:
        return SplitLayout(resized, (tile, tile), 0, 0)
    h, w = _tile_multiple_size(h, w, tile)
    if h > tile or w > tile:
        return SplitLayout(resized, (h, w), h // tile, w // tile)
    return SplitLayout(resized, (h, w), 0, 0)


def expansion_text(layout: SplitLayout, seq_len: int, image_token: str) -> str:
    """The prompt text one image becomes (`Idefics3Processor.replace_image_token`)."""
    tile = image_token * seq_len
    global_view = f"{FAKE_TOKEN}{GLOBAL_TAG}{tile}{FAKE_TOKEN}"
    if not layout.rows:
        return global_view
    lines = "".join("".join(f"{FAKE_TOKEN}<row_{r + 1}_col_{c + 1}>{tile}" for c in range(layout.cols)) + "\n"
                    for r in range(layout.rows))
    return f"{lines}\n{global_view}"


def bucket_positions(patches_per_side: int, tile_patches: int) -> torch.Tensor:
    """The position ids (tile_patches^2,) of a full tile's patches, bucketed onto the encoder's
    patches_per_side^2 grid in float32 exactly as `Idefics3VisionEmbeddings` does (not always 0..N-1: float steps
    land a patch in the bucket below for some sizes)."""
    n = patches_per_side
    boundaries = torch.arange(1 / n, 1.0, 1 / n)  # (n - 1,)
    step = 1.0 / torch.tensor([tile_patches])  # (1,)
    coords = torch.clamp(torch.arange(tile_patches, dtype=torch.float32) * step, max=1.0 - 1e-6)  # (t,)
    buckets = torch.bucketize(coords, boundaries, right=True)  # (t,)
    return (buckets[:, None] * n + buckets[None, :]).reshape(-1)  # (t * t,)
