"""The training generator of the SHAPES world (/work/shared/SHAPES.md): scenes, Pillow drawing, questions, labels.

Everything is deterministic from a seed. Drawing is Pillow's `ImageDraw`, anti-aliased or not at random (anti-aliased
images are drawn at 4x and box-filtered down), and re-encoded as PNG, JPEG (quality 90..100) or WEBP (lossless or
quality 90..100). Besides images and question/answer pairs, a scene yields dense per-patch labels for the vision
encoder's pretraining: the (colour, shape) of the object covering each patch, its left-to-right rank in the caption,
and the image's object count.

This file shares no code with `training/eval_world.py`, the independent renderer used for evaluation.
"""

from __future__ import annotations

import io
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from PIL import Image, ImageDraw

COLOR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
}
COLORS: tuple[str, ...] = tuple(COLOR_RGB)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
PAIRS: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLORS for s in SHAPES)
NUMBER_WORDS: tuple[str, ...] = ("one", "two", "three")
KINDS: tuple[str, ...] = ("color", "shape", "count", "exists", "caption")

T = TypeVar("T")
SIDE_RANGE = (64, 256)
GREY_RANGE = (225, 255)
BOX_FRACTION = (0.20, 0.35)
JITTER = 15
SUPERSAMPLE = 4


@dataclass(frozen=True)
class Shape:
    """One object: names, square box (top-left x, y and side, in canvas pixels, may be fractional), drawn colour."""

    color: str
    shape: str
    x: float
    y: float
    side: float
    rgb: tuple[int, int, int]

    @property
    def center(self) -> tuple[float, float]:
        return self.x + self.side / 2, self.y + self.side / 2


@dataclass(frozen=True)
class World:
    """One scene: canvas side, background grey, anti-aliasing, and its objects."""

    size: int
    grey: int
    smooth: bool
    shapes: tuple[Shape, ...]

    def left_to_right(self) -> list[Shape]:
        """Objects in caption order: by box-centre x, equal x top first."""
        return sorted(self.shapes, key=lambda s: (s.center[0], s.center[1]))


# ------------------------------------------------------------------------------------------------------------ scenes


def _disjoint(a: Shape, b: Shape) -> bool:
    return a.x + a.side <= b.x or b.x + b.side <= a.x or a.y + a.side <= b.y or b.y + b.side <= a.y


def random_world(rng: random.Random, n_shapes: int | None = None) -> World:
    """A random scene that obeys every constraint of SHAPES.md."""
    size = rng.randint(*SIDE_RANGE)
    grey = rng.randint(*GREY_RANGE)
    k = n_shapes or rng.randint(1, 3)
    pairs = rng.sample(PAIRS, k)
    while True:
        placed: list[Shape] = []
        for color, shape in pairs:
            for _ in range(50):
                side = rng.uniform(BOX_FRACTION[0], BOX_FRACTION[1]) * size
                side = min(max(side, BOX_FRACTION[0] * size), BOX_FRACTION[1] * size)
                x, y = rng.uniform(0, size - side), rng.uniform(0, size - side)
                rgb = tuple(min(255, max(0, v + rng.randint(-JITTER, JITTER))) for v in COLOR_RGB[color])
                cand = Shape(color, shape, x, y, side, rgb)  # type: ignore[arg-type]
                if all(_disjoint(cand, p) for p in placed):
                    placed.append(cand)
                    break
        if len(placed) == k:
            return World(size, grey, rng.random() < 0.5, tuple(placed))


# ----------------------------------------------------------------------------------------------------------- drawing


def draw(world: World) -> Image.Image:
    """The scene as an RGB Pillow image (drawn at 4x and reduced when anti-aliased)."""
    f = SUPERSAMPLE if world.smooth else 1
    canvas = Image.new("RGB", (world.size * f, world.size * f), (world.grey,) * 3)
    pen = ImageDraw.Draw(canvas)
    for s in world.shapes:
        x0, y0 = s.x * f, s.y * f
        x1, y1 = (s.x + s.side) * f, (s.y + s.side) * f
        if s.shape == "square":
            pen.rectangle([round(x0), round(y0), round(x1) - 1, round(y1) - 1], fill=s.rgb)
        elif s.shape == "circle":
            pen.ellipse([round(x0), round(y0), round(x1) - 1, round(y1) - 1], fill=s.rgb)
        else:
            pen.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=s.rgb)
    return canvas.reduce(f) if f > 1 else canvas


def reencode(image: Image.Image, rng: random.Random) -> Image.Image:
    """Round-trip through PNG (a no-op), JPEG q90..100 or WEBP (lossless or q90..100), as a client might upload."""
    fmt = rng.choice(("PNG", "JPEG", "WEBP"))
    if fmt == "PNG":
        return image
    buf = io.BytesIO()
    if fmt == "WEBP" and rng.random() < 0.5:
        image.save(buf, format="WEBP", lossless=True)
    else:
        image.save(buf, format=fmt, quality=rng.randint(90, 100))
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def render(world: World, rng: random.Random) -> Image.Image:
    """Draw and re-encode one scene."""
    return reencode(draw(world), rng)


# ------------------------------------------------------------------------------------------------- questions/answers


def caption(world: World) -> str:
    """`a red circle`, `a red circle and a blue square`, `a red circle, a blue square and a green triangle`."""
    words = [f"a {s.color} {s.shape}" for s in world.left_to_right()]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def question_for(world: World, kind: str, rng: random.Random) -> tuple[str, str] | None:
    """(question, answer) of `kind` with SHAPES.md's exact texts, or None when the kind cannot be asked here."""
    if kind == "color":
        counts = Counter(s.shape for s in world.shapes)
        options = [s for s in world.shapes if counts[s.shape] == 1]
        if not options:
            return None
        s = rng.choice(options)
        return f"What color is the {s.shape}?", s.color
    if kind == "shape":
        counts = Counter(s.color for s in world.shapes)
        options = [s for s in world.shapes if counts[s.color] == 1]
        if not options:
            return None
        s = rng.choice(options)
        return f"What shape is the {s.color} object?", s.shape
    if kind == "count":
        return "How many shapes are there?", NUMBER_WORDS[len(world.shapes) - 1]
    if kind == "exists":
        present = {(s.color, s.shape) for s in world.shapes}
        if rng.random() < 0.5:
            color, shape = rng.choice(sorted(present))
            return f"Is there a {color} {shape}?", "yes"
        color, shape = rng.choice([p for p in PAIRS if p not in present])
        return f"Is there a {color} {shape}?", "no"
    if kind == "caption":
        return "Describe the image.", caption(world)
    raise ValueError(f"unknown question kind {kind!r}; known: {KINDS}")


def all_questions() -> list[str]:
    """Every question text the world can ask (29 of them)."""
    out = [f"What color is the {s}?" for s in SHAPES] + [f"What shape is the {c} object?" for c in COLORS]
    out += ["How many shapes are there?", "Describe the image."]
    return out + [f"Is there a {c} {s}?" for c, s in PAIRS]


# ------------------------------------------------------------------------------------------------------ dense labels


@dataclass(frozen=True)
class PatchLabels:
    """Per-patch targets (grid x grid) of one image: pair (0 = background, 1..18), colour (0..6), shape (0..3), rank
    (0 = background, 1..3 left to right) and the image's object count minus one (0..2)."""

    pair: np.ndarray
    color: np.ndarray
    shape: np.ndarray
    rank: np.ndarray
    count: int


def _inside(s: Shape, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Which points (canvas coordinates) lie in the object."""
    x1, y1 = s.x + s.side, s.y + s.side
    if s.shape == "square":
        return (xs >= s.x) & (xs < x1) & (ys >= s.y) & (ys < y1)
    cx, cy = s.center
    if s.shape == "circle":
        return (xs - cx) ** 2 + (ys - cy) ** 2 <= (s.side / 2) ** 2
    return (ys < y1) & (np.abs(xs - cx) * 2 <= ys - s.y)


def patch_labels(world: World, grid: int, *, samples: int = 4, min_cover: float = 0.2) -> PatchLabels:
    """Label each patch of a grid x grid split with the object covering most of it (at least `min_cover`)."""
    step = world.size / grid
    offs = (np.arange(samples) + 0.5) / samples
    coords = ((np.arange(grid)[:, None] + offs[None, :]) * step).reshape(-1)  # (grid * samples,)
    ys, xs = np.meshgrid(coords, coords, indexing="ij")  # (G*s, G*s)
    best = np.zeros((grid, grid))
    pair = np.zeros((grid, grid), dtype=np.int64)
    rank = np.zeros((grid, grid), dtype=np.int64)
    for r, s in enumerate(world.left_to_right(), start=1):
        cover = _inside(s, xs, ys).reshape(grid, samples, grid, samples).mean(axis=(1, 3))  # (G, G)
        win = (cover >= min_cover) & (cover > best)
        best = np.where(win, cover, best)
        pair[win] = PAIRS.index((s.color, s.shape)) + 1
        rank[win] = r
    color = np.where(pair > 0, (pair - 1) // len(SHAPES) + 1, 0)
    shape = np.where(pair > 0, (pair - 1) % len(SHAPES) + 1, 0)
    return PatchLabels(pair, color, shape, rank, len(world.shapes) - 1)


# -------------------------------------------------------------------------------------------------------------- pool


@dataclass
class Pool:
    """Pre-rendered images (already through the serving ImageProcessor) with their scenes and patch labels."""

    pixels: np.ndarray  # (N, 3, H, W) float32, the serving processor's output
    worlds: list[World]
    labels: np.ndarray  # (N, 5, G, G) int64: pair, colour, shape, rank, count (broadcast)

    def __len__(self) -> int:
        return len(self.worlds)


def render_pool(n: int, seed: int, processor: object, grid: int, chunk: int = 256) -> Pool:
    """Render `n` scenes deterministically from `seed` and preprocess them with `processor` (our ImageProcessor)."""
    rng = random.Random(seed)
    worlds = [random_world(rng) for _ in range(n)]
    pixels: list[np.ndarray] = []
    for start in range(0, n, chunk):
        images = [render(w, rng) for w in worlds[start : start + chunk]]
        pixels.append(processor(images).numpy())  # type: ignore[operator]  # (n_chunk, 3, H, W)
    labels = np.zeros((n, 5, grid, grid), dtype=np.int64)
    for i, w in enumerate(worlds):
        lab = patch_labels(w, grid)
        labels[i, 0], labels[i, 1], labels[i, 2], labels[i, 3] = lab.pair, lab.color, lab.shape, lab.rank
        labels[i, 4] = lab.count
    return Pool(np.concatenate(pixels), worlds, labels)


def sample_questions(
    worlds: Sequence[World], rng: random.Random, weights: dict[str, float]
) -> list[tuple[int, str, str, str]]:
    """One (world index, kind, question, answer) per world, kinds drawn with `weights` among those askable."""
    return draw_questions(worlds, rng, weights, question_for)


def draw_questions(
    items: Sequence[T], rng: random.Random, weights: dict[str, float],
    ask: Callable[[T, str, random.Random], tuple[str, str] | None],
) -> list[tuple[int, str, str, str]]:
    """One (item index, kind, question, answer) per item of any world: kinds drawn with `weights`, redrawn until
    `ask` (the world's question_for) has a question of that kind for the item."""
    kinds, w = list(weights), list(weights.values())
    out = []
    for i, item in enumerate(items):
        while True:
            kind = rng.choices(kinds, w)[0]
            qa = ask(item, kind, rng)
            if qa is not None:
                out.append((i, kind, *qa))
                break
    return out
