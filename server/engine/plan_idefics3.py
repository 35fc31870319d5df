"""Planning an Idefics3 / SmolVLM image before any pixel work: which processor setting its budget picks, and the
token layout it becomes (model/idefics3.py), from its header size.

Settings, most tokens first: the processor's own (`size` longest_edge L with image splitting), then L lowered one
tile at a time (transformers' `size={"longest_edge": k * tile}`, the knob SmolVLM documents), then no splitting (one
tile, the global view alone: `do_image_splitting=False`). `auto` and `high` take the first that fits
`max_image_tokens` (the processor's defaults are its most); `low` is the last, the fewest the family has (64 + 3
tokens for SmolVLM's 512 px tiles, 169 + 3 for Idefics3-8B's 364 px ones).
"""

from __future__ import annotations

from vlmserve.model.idefics3 import SplitLayout, expansion_text, split_layout
from vlmserve.model.image_config import ImageProcessorConfig
from vlmserve.model.tokenizer import ChatTokenizer

from .image_plan import ImagePlan
from .requests import BadRequest


class Idefics3Planner:
    """Image plans of one Idefics3 checkpoint: its processor settings, its tokenizer's ids for the tile tags."""

    def __init__(self, tokenizer: ChatTokenizer, config: ImageProcessorConfig, seq_len: int) -> None:
        if tokenizer.image_token is None or tokenizer.image_token_id is None:
            raise ValueError("an idefics3 checkpoint needs the tokenizer's <image> token")
        self.tokenizer, self.config, self.seq_len = tokenizer, config, seq_len
        self.image_token, self.image_token_id = tokenizer.image_token, tokenizer.image_token_id
        self._layouts: dict[tuple[int, int], tuple[int, ...]] = {}  # (rows, cols) -> ids; rows, cols <= 4096 / tile
        self.token_layout(SplitLayout(None, (config.tile_size, config.tile_size), 0, 0))  # checks the tokenizer

    def token_layout(self, split: SplitLayout) -> tuple[int, ...]:
        """The ids of the image's span: its tags tokenized as transformers tokenizes the processor's expansion (every
        tag lies between two added tokens, so it tokenizes alone), `<image>` slots at the image token id."""
        key = (split.rows, split.cols)
        if key not in self._layouts:
            text = expansion_text(split, self.seq_len, self.image_token)
            ids = tuple(self.tokenizer.encode_text(text, parse_special_tokens=True))
            if ids.count(self.image_token_id) != split.num_tiles * self.seq_len:
                raise ValueError(f"the tokenizer splits {self.image_token!r} in the image layout: "
                                 f"{ids.count(self.image_token_id)} slots for {split.num_tiles} tiles")
            self._layouts[key] = ids
        return self._layouts[key]

    def settings(self, detail: str | None) -> list[tuple[int | None, bool]]:
        """(longest_edge, splitting) settings in order of preference for `detail`."""
        cfg = self.config
        one_tile = (cfg.longest_edge, False)
        if detail == "low" or not cfg.do_image_splitting:
            return [one_tile]
        edges: list[int | None] = [cfg.longest_edge]
        if cfg.longest_edge is not None:
            edges += list(range((cfg.longest_edge - 1) // cfg.tile_size * cfg.tile_size, cfg.tile_size, -cfg.tile_size))
        return [(e, True) for e in edges] + [one_tile]

    def plan(self, detail: str | None, max_image_tokens: int | None, size: tuple[int, int]) -> ImagePlan:
        """The first setting for `detail` within `max_image_tokens`; BadRequest with the numbers when none fits."""
        fewest = 0
        for edge, splitting in self.settings(detail):
            split = split_layout(*size, tile=self.config.tile_size, longest_edge=edge, splitting=splitting)
            ids = self.token_layout(split)
            if max_image_tokens is None or len(ids) <= max_image_tokens:
                return ImagePlan(len(ids), split=split, token_layout=ids)
            fewest = len(ids)
        raise BadRequest(f"this {size[1]}x{size[0]} image makes at least {fewest} visual tokens (one tile and its "
                         f"tags); max_image_tokens {max_image_tokens} is below that")
