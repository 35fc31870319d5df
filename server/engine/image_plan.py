"""What one image of a request becomes, decided from its budget and header size before any pixel work
(`RequestPreparer.plan`, server/engine/prepare.py, and the per-family planners beside it)."""

from __future__ import annotations

from dataclasses import dataclass

from vlmserve.model.anyres import Layout
from vlmserve.model.idefics3 import SplitLayout
from vlmserve.model.pan_and_scan import Box
from vlmserve.model.qwen2_vision import Grid

LOW_TOKENS = 100  # OpenAI's `detail: low` is one small view; where a family can, at most this many visual tokens


@dataclass(frozen=True)
class ImagePlan:
    """How one image of a request becomes visual tokens, decided before any pixel work: how many (all its views'),
    and for a tiled (llava_next) model its layout of tiles."""

    tokens: int
    layout: Layout | None = None  # llava_next: its tiles
    resized: tuple[int, int] | None = None  # qwen2_vl: the (h, w) it is resized to
    grid: Grid | None = None  # qwen2_vl: its (t, h, w) in patches
    split: SplitLayout | None = None  # idefics3: its resizes and tiles
    token_layout: tuple[int, ...] | None = None  # idefics3: the ids of its whole span, `<image>` slots included
    crops: tuple[Box, ...] = ()  # gemma3's pan and scan: its crops, each a view (and a span) of its own

    @property
    def views(self) -> int:
        """The image's views, each its own engine input and span: the image, then its crops."""
        return 1 + len(self.crops)

    @property
    def slots(self) -> int | tuple[int, ...]:
        """The slot counts as the tokenizer takes them: the image's, or each of its views' (all of one size)."""
        return self.tokens if not self.crops else (self.tokens // self.views,) * self.views

    @property
    def setting(self) -> str:
        """The resolution setting, part of the image's cache key: `base` (the whole image as one tile) or `grid`
        (llava_next), the resized size (qwen2_vl), the resizes (idefics3: they fix its tiles and tags)."""
        if self.split is not None:
            first = "x".join(map(str, self.split.resized)) if self.split.resized else "asis"
            return f"{first}-{self.split.grid[0]}x{self.split.grid[1]}-{self.split.rows}x{self.split.cols}"
        if self.resized is not None:
            return f"{self.resized[0]}x{self.resized[1]}"
        return "" if self.layout is None else ("base" if not self.layout.rows else "grid")
