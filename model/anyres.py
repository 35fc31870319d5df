"""LLaVA-NeXT's "anyres" images: a grid of encoder-sized tiles chosen per image, plus the whole image as one tile.

An image of (h, w) is scaled into the best of the checkpoint's `image_grid_pinpoints` (the resolution that keeps the
most of its pixels, then wastes the least), padded to it with zeros, and cut into tiles of the encoder's input
size; the whole image, resized to one tile, goes first. The encoder sees every tile. The visual tokens are the base
tile's S x S features, then the grid's features as one (rows * S, cols * S) map with the padding rows or columns
cut off again ("unpad") and the learned `image_newline` vector after each of its rows.

All of it follows transformers' `LlavaNextImageProcessorPil` and `LlavaNextModel.pack_image_features` (5.x) step by
step; `Layout` is what the encoder side needs to know of an image (its size and its grid), known from the image's
header before any pixel work, so the token count is known then too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

Pinpoints = tuple[tuple[int, int], ...]  # (height, width) resolutions the grid may take


def best_resolution(height: int, width: int, pinpoints: Pinpoints) -> tuple[int, int]:
    """The pinpoint (h, w) that keeps the most of an image's pixels when it is scaled into it, then wastes the
    least (transformers' `select_best_resolution`)."""
    best, most, least = pinpoints[0], 0, math.inf
    for ph, pw in pinpoints:
        scale = min(pw / width, ph / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = ph * pw - effective
        if effective > most or (effective == most and wasted < least):
            best, most, least = (ph, pw), effective, wasted
    return best


def fitted_size(height: int, width: int, target: tuple[int, int]) -> tuple[int, int]:
    """(h, w) of the image scaled to fit `target` (h, w), aspect kept (transformers' `get_patch_output_size`)."""
    th, tw = target
    scale_w, scale_h = tw / width, th / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), th), tw
    return th, min(math.ceil(width * scale_h), tw)


def unpadded(height: int, width: int, map_h: int, map_w: int) -> tuple[slice, slice]:
    """The rows and columns of a (map_h, map_w) feature map of the padded grid that an (height, width) image covers
    (transformers' `unpad_image`)."""
    if width / height > map_w / map_h:
        new_h = int(round(height * (map_w / width), 7))
        pad = (map_h - new_h) // 2
        return slice(pad, map_h - pad), slice(0, map_w)
    new_w = int(round(width * (map_h / height), 7))
    pad = (map_w - new_w) // 2
    return slice(0, map_h), slice(pad, map_w - pad)


@dataclass(frozen=True)
class Layout:
    """One anyres image as the encoder side sees it: its size, and its grid of tiles (0 x 0: the base tile only)."""

    height: int
    width: int
    rows: int
    cols: int
    pad_square: bool = False  # the base tile alone, the image padded to a square first (LLaVA-OneVision's multi-image)

    @property
    def num_tiles(self) -> int:
        return 1 + self.rows * self.cols


@dataclass(frozen=True)
class Anyres:
    """A checkpoint's anyres geometry: pinpoints, tile size (the encoder's input) and S, its features per side."""

    pinpoints: Pinpoints
    tile: int
    side: int
    max_tiles: int | None = None  # LLaVA-OneVision's anyres_max_N: a grid past ~N tiles of features is shrunk
    pad_square_base: bool = False  # LLaVA-OneVision: a lone base tile is the image padded to a square

    def layout(self, height: int, width: int, *, base_only: bool = False) -> Layout:
        if base_only:
            return Layout(height, width, 0, 0, pad_square=self.pad_square_base)
        gh, gw = best_resolution(height, width, self.pinpoints)
        return Layout(height, width, gh // self.tile, gw // self.tile)

    def _shrunk(self, h: int, w: int) -> tuple[int, int] | None:
        """anyres_max_N: the (h, w) an unpadded feature map of more than ~N tiles' features is resized to."""
        if self.max_tiles is None:
            return None
        ratio = math.sqrt(h * w / (self.max_tiles * self.side**2))
        return (int(h // ratio), int(w // ratio)) if ratio > 1.1 else None

    def num_tokens(self, layout: Layout) -> int:
        """Visual tokens of an image: the base tile's S x S, then the unpadded grid with a newline per row (the base
        tile alone gets one newline after it)."""
        if not layout.rows:
            return self.side * self.side + 1
        rows, cols = unpadded(layout.height, layout.width, layout.rows * self.side, layout.cols * self.side)
        h, w = int(rows.stop) - int(rows.start), int(cols.stop) - int(cols.start)
        h, w = self._shrunk(h, w) or (h, w)
        return self.side * self.side + h * w + h

    def pack(self, features: torch.Tensor, layout: Layout, newline: torch.Tensor) -> torch.Tensor:
        """(num_tiles, S*S, D) projected tile features + newline (D,) -> (num_tokens, D), in prompt order."""
        s = self.side
        base = features[0]  # (S*S, D)
        if not layout.rows:
            return torch.cat([base, newline[None].to(base)])  # (S*S + 1, D)
        d = features.shape[-1]
        grid = features[1:].view(layout.rows, layout.cols, s, s, d)  # (R, C, S, S, D)
        grid = grid.permute(0, 2, 1, 3, 4).reshape(layout.rows * s, layout.cols * s, d)  # (R*S, C*S, D)
        rows, cols = unpadded(layout.height, layout.width, layout.rows * s, layout.cols * s)
        grid = grid[rows, cols]  # (h, w, D)
        if (size := self._shrunk(grid.shape[0], grid.shape[1])) is not None:
            chw = grid.permute(2, 0, 1).contiguous()[None]  # (1, D, h, w)
            grid = F.interpolate(chw, list(size), mode="bilinear")[0].permute(1, 2, 0)  # (h', w', D)
        lines = newline.to(grid)[None, None].expand(grid.shape[0], 1, d)  # (h, 1, D)
        grid = torch.cat([grid, lines], dim=1).reshape(-1, d)  # (h * (w + 1), D)
        return torch.cat([base, grid])  # (num_tokens, D)


def tiles(image: Image.Image, layout: Layout, tile: int, base_size: tuple[int, int],
          resample: Image.Resampling) -> list[Image.Image]:
    """The base image (resized to `base_size` (h, w)) then the grid's tiles, row by row, as RGB images: resized into
    the grid resolution, aspect kept, centred on zeros (transformers' `get_image_patches`)."""
    base = image.resize((base_size[1], base_size[0]), resample)
    if not layout.rows:
        return [base]
    gh, gw = layout.rows * tile, layout.cols * tile
    nh, nw = fitted_size(image.height, image.width, (gh, gw))
    canvas = Image.new("RGB", (gw, gh), (0, 0, 0))
    canvas.paste(image.resize((nw, nh), resample), ((gw - nw) // 2, (gh - nh) // 2))
    pixels = np.asarray(canvas)  # (gh, gw, 3)
    out = [base]
    for r in range(layout.rows):
        for c in range(layout.cols):
            out.append(Image.fromarray(pixels[r * tile : (r + 1) * tile, c * tile : (c + 1) * tile]))
    return out


def parse_pinpoints(value: object) -> Pinpoints:
    """A config's `image_grid_pinpoints` ([[h, w], ...]) as a tuple of pairs; ValueError when malformed."""
    if not isinstance(value, Sequence) or not value:
        raise ValueError(f"image_grid_pinpoints must be a non-empty list of [height, width], got {value!r}")
    out = []
    for p in value:
        if not isinstance(p, Sequence) or len(p) != 2 or not all(isinstance(x, int) and x > 0 for x in p):
            raise ValueError(f"image_grid_pinpoints entries must be [height, width] of positive ints, got {p!r}")
        out.append((int(p[0]), int(p[1])))
    return tuple(out)
