"""Qwen2-VL's M-RoPE positions: every token has a (time, row, column) position; text tokens have three equal ones.

A text token's position is its index in the sequence shifted by what the images before it took: an image of
(h, w) merged tokens covers h * w indices but advances the position by max(h, w) only. Its own tokens sit at
(p, p + row, p + column), p being the position the image starts at (transformers' `get_rope_index`, 5.x). Decode
tokens come after every image, so their position is index + the sequence's total shift and one number suffices
(model/text.py's `sectioned` gives equal positions exactly the plain rotary angles).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class GridSpan:
    """An image's tokens in a sequence: where they start, and the merged grid (rows, columns) they fill."""

    start: int
    rows: int
    cols: int

    @property
    def length(self) -> int:
        return self.rows * self.cols

    @property
    def shift(self) -> int:
        """How much less than its length the image advances the position."""
        return max(self.rows, self.cols) - self.length


def text_position(index: int, spans: Sequence[GridSpan]) -> int:
    """The position of a text token at `index` (spans in order, none covering it)."""
    return index + sum(s.shift for s in spans if s.start + s.length <= index)


def positions(lo: int, hi: int, spans: Sequence[GridSpan]) -> tuple[list[int], list[list[int]] | None]:
    """For the tokens lo..hi-1: their 1-D positions (text: as above; image tokens: the image's start position) and,
    when any of them is an image token, the three rows (time, row, column); None when all three equal the first."""
    flat: list[int] = []
    rows: list[list[int]] | None = None
    shift = 0
    pending = list(spans)
    for i in range(lo, hi):
        while pending and pending[0].start + pending[0].length <= i:
            shift += pending.pop(0).shift
        span = pending[0] if pending and pending[0].start <= i else None
        if span is None:
            flat.append(i + shift)
            if rows is not None:
                for r in rows:
                    r.append(i + shift)
            continue
        if rows is None:
            rows = [list(flat), list(flat), list(flat)]
        base = span.start + shift
        offset = i - span.start
        flat.append(base)
        rows[0].append(base)
        rows[1].append(base + offset // span.cols)
        rows[2].append(base + offset % span.cols)
    return flat, rows
