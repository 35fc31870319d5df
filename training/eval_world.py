"""An independent renderer of the SHAPES world (docs: /work/shared/SHAPES.md), used only for evaluation.

It follows the spec alone and shares no drawing code with the training generator: shapes are rasterised with
numpy from per-pixel coverage (one sample at the pixel centre for hard edges, 4x4 supersampling for anti-aliased
images), box geometry is continuous (sub-pixel positions and sides), and each image is encoded as PNG, JPEG
(quality 90..100) or WEBP (lossless or quality 90..100).
"""

from __future__ import annotations

import io
import logging
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
from PIL import Image

logger = logging.getLogger(__name__)

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
KINDS: tuple[str, ...] = ("color", "shape", "count", "exists", "caption")
COUNT_WORDS: dict[int, str] = {1: "one", 2: "two", 3: "three"}
FORMATS: dict[str, str] = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}

MIN_SIDE, MAX_SIDE = 64, 256
MIN_GREY, MAX_GREY = 225, 255
MIN_BOX_FRAC, MAX_BOX_FRAC = 0.20, 0.35
MAX_JITTER = 15
AA_SAMPLES = 4


@dataclass(frozen=True)
class SceneObject:
    """One drawn object: its names, its square bounding box (continuous pixel coordinates) and its drawn RGB."""

    color: str
    shape: str
    x0: float
    y0: float
    side: float
    rgb: tuple[int, int, int]

    @property
    def cx(self) -> float:
        return self.x0 + self.side / 2

    @property
    def cy(self) -> float:
        return self.y0 + self.side / 2

    @property
    def x1(self) -> float:
        return self.x0 + self.side

    @property
    def y1(self) -> float:
        return self.y0 + self.side


@dataclass(frozen=True)
class Scene:
    """A canvas of side `size`, grey `background`, drawn anti-aliased or not, holding 1-3 objects."""

    size: int
    background: int
    antialias: bool
    objects: tuple[SceneObject, ...]


@dataclass(frozen=True)
class RenderedImage:
    """An encoded image and the scene it shows."""

    image: bytes
    mime: str
    scene: Scene


@dataclass(frozen=True)
class EvalItem:
    """One evaluation question about one image."""

    image: bytes
    mime: str
    question: str
    answer: str
    kind: str


# --------------------------------------------------------------------------------------------------- scenes


def boxes_overlap(a: SceneObject, b: SceneObject) -> bool:
    """True when the open interiors of the two bounding boxes intersect (touching edges do not overlap)."""
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def jitter_color(nominal: tuple[int, int, int], rng: np.random.Generator) -> tuple[int, int, int]:
    """Each channel moved independently by an integer in [-15, 15], then clipped to 0..255."""
    offsets = rng.integers(-MAX_JITTER, MAX_JITTER + 1, size=3)
    r, g, b = (int(v) for v in np.clip(np.asarray(nominal) + offsets, 0, 255))
    return (r, g, b)


def sample_scene(rng: np.random.Generator, n_objects: int | None = None, max_tries: int = 1000) -> Scene:
    """Draw a random scene obeying every SHAPES constraint (side, grey, count, unique pairs, boxes)."""
    size = int(rng.integers(MIN_SIDE, MAX_SIDE + 1))
    background = int(rng.integers(MIN_GREY, MAX_GREY + 1))
    antialias = bool(rng.random() < 0.5)
    k = int(rng.integers(1, 4)) if n_objects is None else n_objects
    if not 1 <= k <= 3:
        raise ValueError(f"a scene holds 1 to 3 objects, not {k}")
    pairs = [(c, s) for c in COLORS for s in SHAPES]
    chosen = [pairs[i] for i in rng.choice(len(pairs), size=k, replace=False)]
    for _ in range(max_tries):
        placed: list[SceneObject] = []
        for color, shape in chosen:
            side = float(rng.uniform(MIN_BOX_FRAC * size, MAX_BOX_FRAC * size))
            for _ in range(100):
                x0 = float(rng.uniform(0.0, size - side))
                y0 = float(rng.uniform(0.0, size - side))
                candidate = SceneObject(color, shape, x0, y0, side, (0, 0, 0))
                if not any(boxes_overlap(candidate, other) for other in placed):
                    placed.append(SceneObject(color, shape, x0, y0, side, jitter_color(COLORS[color], rng)))
                    break
            else:
                break
        if len(placed) == k:
            return Scene(size, background, antialias, tuple(placed))
    raise RuntimeError("could not place the boxes without overlap")


# --------------------------------------------------------------------------------------------------- raster


def _inside(shape: str, obj: SceneObject, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Boolean mask of the sample points (xs, ys broadcast together) that lie in the shape."""
    if shape == "square":
        return (xs >= obj.x0) & (xs <= obj.x1) & (ys >= obj.y0) & (ys <= obj.y1)
    if shape == "circle":
        r = obj.side / 2
        return (xs - obj.cx) ** 2 + (ys - obj.cy) ** 2 <= r * r
    if shape == "triangle":
        # apex (cx, y0), base from (x0, y1) to (x1, y1): the half-width grows from 0 to side/2 going down.
        return (ys <= obj.y1) & (2.0 * np.abs(xs - obj.cx) <= ys - obj.y0)
    raise ValueError(f"unknown shape {shape!r}")


def coverage(obj: SceneObject, size: int, antialias: bool) -> tuple[slice, slice, np.ndarray]:
    """Fraction of each pixel covered by the object, over the pixel rectangle around its box."""
    j0, j1 = max(0, math.floor(obj.x0)), min(size, math.ceil(obj.x1))
    i0, i1 = max(0, math.floor(obj.y0)), min(size, math.ceil(obj.y1))
    n = AA_SAMPLES if antialias else 1
    offsets = (np.arange(n) + 0.5) / n
    xs = (np.arange(j0, j1)[:, None] + offsets[None, :]).reshape(1, 1, j1 - j0, n)
    ys = (np.arange(i0, i1)[:, None] + offsets[None, :]).reshape(i1 - i0, n, 1, 1)
    cov = _inside(obj.shape, obj, xs, ys).mean(axis=(1, 3))
    return slice(i0, i1), slice(j0, j1), cov


def render(scene: Scene) -> npt.NDArray[np.uint8]:
    """The scene as an (S, S, 3) uint8 array: each pixel blends background and object by its coverage."""
    canvas = np.full((scene.size, scene.size, 3), float(scene.background))
    for obj in scene.objects:
        rows, cols, cov = coverage(obj, scene.size, scene.antialias)
        region = canvas[rows, cols]
        canvas[rows, cols] = region * (1.0 - cov[..., None]) + np.asarray(obj.rgb, dtype=float) * cov[..., None]
    pixels: npt.NDArray[np.uint8] = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    return pixels


def encode(pixels: np.ndarray, fmt: str, quality: int | None = None, lossless: bool = False) -> tuple[bytes, str]:
    """Encode an RGB array as PNG, JPEG or WEBP; returns (bytes, mime type)."""
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 array, got {pixels.dtype} {pixels.shape}")
    image = Image.fromarray(pixels)
    buf = io.BytesIO()
    if fmt == "PNG":
        image.save(buf, format="PNG")
    elif fmt == "JPEG":
        image.save(buf, format="JPEG", quality=95 if quality is None else quality)
    elif fmt == "WEBP":
        if lossless:
            image.save(buf, format="WEBP", lossless=True)
        else:
            image.save(buf, format="WEBP", quality=95 if quality is None else quality)
    else:
        raise ValueError(f"unsupported format {fmt!r}")
    return buf.getvalue(), FORMATS[fmt]


def encode_random(pixels: np.ndarray, rng: np.random.Generator) -> tuple[bytes, str]:
    """Encode in a format chosen uniformly: PNG, JPEG (quality 90..100), WEBP (lossless or quality 90..100)."""
    fmt = ("PNG", "JPEG", "WEBP")[int(rng.integers(3))]
    quality = int(rng.integers(90, 101))
    lossless = bool(rng.random() < 0.5)
    return encode(pixels, fmt, quality=quality, lossless=lossless)


def random_image(rng: np.random.Generator, n_objects: int | None = None) -> RenderedImage:
    """A fresh random scene, rendered and encoded in a random format."""
    scene = sample_scene(rng, n_objects)
    data, mime = encode_random(render(scene), rng)
    return RenderedImage(data, mime, scene)


# --------------------------------------------------------------------------------------------------- questions


def caption(scene: Scene) -> str:
    """Objects left to right by box-centre x (equal x: top first), e.g. `a red circle, a blue square and ...`."""
    ordered = sorted(scene.objects, key=lambda o: (o.cx, o.cy))
    phrases = [f"a {o.color} {o.shape}" for o in ordered]
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def ask(scene: Scene, kind: str, rng: np.random.Generator, present: bool | None = None) -> tuple[str, str] | None:
    """A (question, answer) of the given kind about the scene, or None when the kind cannot be asked of it.

    For `exists`, `present` picks a yes (present pair) or no (absent pair) question; None picks at random.
    """
    objs = scene.objects
    if kind == "color":
        shape_counts = Counter(o.shape for o in objs)
        unique = [o for o in objs if shape_counts[o.shape] == 1]
        if not unique:
            return None
        target = unique[int(rng.integers(len(unique)))]
        return f"What color is the {target.shape}?", target.color
    if kind == "shape":
        color_counts = Counter(o.color for o in objs)
        unique = [o for o in objs if color_counts[o.color] == 1]
        if not unique:
            return None
        target = unique[int(rng.integers(len(unique)))]
        return f"What shape is the {target.color} object?", target.shape
    if kind == "count":
        return "How many shapes are there?", COUNT_WORDS[len(objs)]
    if kind == "exists":
        if present is None:
            present = bool(rng.random() < 0.5)
        have = {(o.color, o.shape) for o in objs}
        pool = sorted(have) if present else [(c, s) for c in COLORS for s in SHAPES if (c, s) not in have]
        color, shape = pool[int(rng.integers(len(pool)))]
        return f"Is there a {color} {shape}?", "yes" if present else "no"
    if kind == "caption":
        return "Describe the image.", caption(scene)
    raise ValueError(f"unknown kind {kind!r}")


def make_eval_records(n_questions: int, seed: int) -> list[tuple[EvalItem, Scene]]:
    """Like make_eval_set, each item paired with the scene its image shows (one fresh image per question)."""
    rng = np.random.default_rng(seed)
    kinds = [KINDS[i % len(KINDS)] for i in range(n_questions)]
    kinds = [kinds[i] for i in rng.permutation(n_questions)]
    n_exists = kinds.count("exists")
    answers_yes = [True] * (n_exists // 2) + [False] * (n_exists // 2)
    if n_exists % 2:
        answers_yes.append(bool(rng.random() < 0.5))
    answers_yes = [answers_yes[i] for i in rng.permutation(n_exists)]
    records: list[tuple[EvalItem, Scene]] = []
    for kind in kinds:
        present = answers_yes.pop() if kind == "exists" else None
        while True:
            scene = sample_scene(rng)
            qa = ask(scene, kind, rng, present)
            if qa is not None:
                break
        data, mime = encode_random(render(scene), rng)
        records.append((EvalItem(data, mime, qa[0], qa[1], kind), scene))
    logger.debug("eval set: %d questions, seed %d, kinds %s", n_questions, seed, dict(Counter(kinds)))
    return records


def make_eval_set(n_questions: int, seed: int) -> list[EvalItem]:
    """`n_questions` items, kinds balanced (~20% each), exists ~50/50 yes/no; deterministic from `seed`."""
    return [item for item, _ in make_eval_records(n_questions, seed)]


# --------------------------------------------------------------------------------------------------- grading


class Graded(Protocol):
    """What grading reads of an item (of either world: this file's EvalItem, eval_sounds.py's SoundItem)."""

    @property
    def kind(self) -> str: ...

    @property
    def answer(self) -> str: ...


def normalize(text: str) -> str:
    """Strip whitespace, lowercase, drop one trailing period."""
    text = text.strip().lower()
    return text[:-1] if text.endswith(".") else text


def grade(prediction: str, answer: str) -> bool:
    """Exact match after normalising both sides."""
    return normalize(prediction) == normalize(answer)


def score(items: Sequence[Graded], predictions: Sequence[str], kinds: Sequence[str] = KINDS) -> dict[str, Any]:
    """Overall and per-kind accuracy with counts.

    Returns {"accuracy", "correct", "n", "per_kind": {kind: {"accuracy", "correct", "n"}}}; every kind in `kinds`
    (the world's question kinds; SHAPES' by default) is listed, with accuracy NaN when it has no items (so a
    threshold check on it fails).
    """
    if len(items) != len(predictions):
        raise ValueError(f"{len(items)} items but {len(predictions)} predictions")
    totals: Counter[str] = Counter()
    right: Counter[str] = Counter()
    for item, prediction in zip(items, predictions, strict=True):
        totals[item.kind] += 1
        right[item.kind] += grade(prediction, item.answer)
    per_kind = {
        kind: {
            "accuracy": right[kind] / totals[kind] if totals[kind] else math.nan,
            "correct": right[kind],
            "n": totals[kind],
        }
        for kind in [*kinds, *sorted(set(totals) - set(kinds))]
    }
    n = len(items)
    correct = sum(right.values())
    return {"accuracy": correct / n if n else math.nan, "correct": correct, "n": n, "per_kind": per_kind}
