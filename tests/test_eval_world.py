"""training/eval_world.py: the independent SHAPES renderer and question set follow /work/shared/SHAPES.md."""

from __future__ import annotations

import io
import math
import re
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from vlmserve.training.eval_world import (
    COLORS,
    KINDS,
    SHAPES,
    EvalItem,
    Scene,
    SceneObject,
    ask,
    caption,
    coverage,
    encode,
    grade,
    make_eval_records,
    make_eval_set,
    render,
    sample_scene,
    score,
)

N_SCENES = 300


@pytest.fixture(scope="module")
def scenes() -> list[Scene]:
    rng = np.random.default_rng(1234)
    return [sample_scene(rng) for _ in range(N_SCENES)]


@pytest.fixture(scope="module")
def records() -> list[tuple[EvalItem, Scene]]:
    return make_eval_records(400, seed=99)


def decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


# --------------------------------------------------------------------------------------------------- determinism


def test_deterministic_from_seed() -> None:
    assert make_eval_set(40, seed=5) == make_eval_set(40, seed=5)
    assert make_eval_set(40, seed=5) != make_eval_set(40, seed=6)


# --------------------------------------------------------------------------------------------------- scenes


def test_scene_constraints(scenes: list[Scene]) -> None:
    sizes = [s.size for s in scenes]
    greys = [s.background for s in scenes]
    assert min(sizes) >= 64 and max(sizes) <= 256 and max(sizes) - min(sizes) > 150
    assert min(greys) >= 225 and max(greys) <= 255 and max(greys) - min(greys) > 20
    assert Counter(len(s.objects) for s in scenes).keys() == {1, 2, 3}
    assert {s.antialias for s in scenes} == {True, False}
    for s in scenes:
        assert 1 <= len(s.objects) <= 3
        pairs = [(o.color, o.shape) for o in s.objects]
        assert len(set(pairs)) == len(pairs)
        for o in s.objects:
            assert o.color in COLORS and o.shape in SHAPES
            assert 0.20 * s.size <= o.side <= 0.35 * s.size
            assert o.x0 >= 0 and o.y0 >= 0 and o.x0 + o.side <= s.size and o.y0 + o.side <= s.size
            assert all(abs(c - n) <= 15 and 0 <= c <= 255 for c, n in zip(o.rgb, COLORS[o.color], strict=True))
        for i, a in enumerate(s.objects):
            for b in s.objects[i + 1 :]:
                disjoint_x = a.x0 + a.side <= b.x0 or b.x0 + b.side <= a.x0
                disjoint_y = a.y0 + a.side <= b.y0 or b.y0 + b.side <= a.y0
                assert disjoint_x or disjoint_y
    seen = Counter((o.color, o.shape) for s in scenes for o in s.objects)
    assert len(seen) == len(COLORS) * len(SHAPES)


def test_pixels_on_decoded_png(scenes: list[Scene]) -> None:
    blended = 0
    for s in scenes:
        image = decode(encode(render(s), "PNG")[0])
        assert image.format == "PNG" and image.mode == "RGB" and image.size == (s.size, s.size)
        px = np.asarray(image).astype(int)
        touched = np.zeros((s.size, s.size), dtype=bool)
        for o in s.objects:
            centre = px[int(o.cy), int(o.cx)]
            assert tuple(centre) == o.rgb
            assert np.all(np.abs(centre - np.asarray(COLORS[o.color])) <= 15)
            touched[math.floor(o.y0) : math.ceil(o.y0 + o.side), math.floor(o.x0) : math.ceil(o.x0 + o.side)] = True
        assert np.all(px[~touched] == s.background)  # flat grey background, one level for all channels
        allowed = {s.background * 0x10101} | {(o.rgb[0] << 16) | (o.rgb[1] << 8) | o.rgb[2] for o in s.objects}
        values = set(np.unique((px[..., 0] << 16) | (px[..., 1] << 8) | px[..., 2]).tolist())
        if s.antialias:
            blended += len(values - allowed) > 0
        else:
            assert values <= allowed  # hard edges: only background and object colours
    assert blended > 0.8 * sum(s.antialias for s in scenes)


@pytest.mark.parametrize("antialias", [True, False])
@pytest.mark.parametrize(("shape", "area"), [("circle", math.pi / 4), ("square", 1.0), ("triangle", 0.5)])
def test_shape_geometry(shape: str, area: float, antialias: bool) -> None:
    obj = SceneObject("red", shape, 10.3, 20.6, 60.5, COLORS["red"])
    rows, cols, cov = coverage(obj, 128, antialias)
    assert cov.sum() == pytest.approx(area * obj.side**2, rel=0.02)
    grid = np.zeros((128, 128))
    grid[rows, cols] = cov
    top_left, top_mid = grid[22, 12], grid[22, int(obj.cx)]
    bottom_left, bottom_mid, mid_left = grid[79, 12], grid[79, int(obj.cx)], grid[int(obj.cy), 12]
    assert grid[int(obj.cy), int(obj.cx)] == 1.0
    if shape == "square":
        assert top_left == top_mid == bottom_left == bottom_mid == mid_left == 1.0
    elif shape == "circle":
        assert top_left == bottom_left == 0.0 and top_mid == bottom_mid == mid_left == 1.0
    else:  # apex up: top corners and the left edge empty, the whole base filled
        assert top_left == mid_left == 0.0 and bottom_left == bottom_mid == 1.0 and grid[22, 12:60].sum() < 3


# --------------------------------------------------------------------------------------------------- formats


def test_formats_decode(records: list[tuple[EvalItem, Scene]]) -> None:
    expected = {"image/png": "PNG", "image/jpeg": "JPEG", "image/webp": "WEBP"}
    mimes = Counter(item.mime for item, _ in records)
    assert set(mimes) == set(expected) and min(mimes.values()) > 0.2 * len(records)
    for item, s in records:
        image = decode(item.image)
        assert image.format == expected[item.mime]
        assert image.size == (s.size, s.size)
        assert image.convert("RGB").size == (s.size, s.size)


# --------------------------------------------------------------------------------------------------- questions


def expected_caption(s: Scene) -> str:
    ordered = sorted(s.objects, key=lambda o: (o.x0 + o.side / 2, o.y0 + o.side / 2))
    words = [f"a {o.color} {o.shape}" for o in ordered]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def test_answers_match_scene(records: list[tuple[EvalItem, Scene]]) -> None:
    for item, s in records:
        objs = s.objects
        assert item.answer == item.answer.strip().lower() and not item.answer.endswith(".")
        if item.kind == "color":
            (shape,) = re.fullmatch(r"What color is the (circle|square|triangle)\?", item.question).groups()
            (match,) = [o for o in objs if o.shape == shape]
            assert item.answer == match.color
        elif item.kind == "shape":
            (color,) = re.fullmatch(r"What shape is the (\w+) object\?", item.question).groups()
            (match,) = [o for o in objs if o.color == color]
            assert item.answer == match.shape
        elif item.kind == "count":
            assert item.question == "How many shapes are there?"
            assert item.answer == {1: "one", 2: "two", 3: "three"}[len(objs)]
        elif item.kind == "exists":
            color, shape = re.fullmatch(r"Is there a (\w+) (\w+)\?", item.question).groups()
            assert color in COLORS and shape in SHAPES
            assert item.answer == ("yes" if (color, shape) in {(o.color, o.shape) for o in objs} else "no")
        else:
            assert item.kind == "caption" and item.question == "Describe the image."
            assert item.answer == expected_caption(s)


def test_balance(records: list[tuple[EvalItem, Scene]]) -> None:
    n = len(records)
    kinds = Counter(item.kind for item, _ in records)
    assert set(kinds) == set(KINDS)
    assert all(abs(c - n / 5) <= 0.03 * n for c in kinds.values())
    yes_no = Counter(item.answer for item, _ in records if item.kind == "exists")
    assert set(yes_no) == {"yes", "no"} and abs(yes_no["yes"] - yes_no["no"]) <= 1
    absent = {item.question for item, _ in records if item.kind == "exists" and item.answer == "no"}
    assert len(absent) >= 12  # absent pairs drawn from all 18, not a few fixed ones
    counts = Counter(item.answer for item, _ in records if item.kind == "count")
    assert set(counts) == {"one", "two", "three"}
    assert len({item.image for item, _ in records}) == n  # a fresh image per question


def test_caption_order_with_ties() -> None:
    # equal box-centre x (20.0) from different boxes: the top one comes first; then the rightmost object
    a = SceneObject("blue", "square", 12.0, 60.0, 16.0, COLORS["blue"])
    b = SceneObject("red", "circle", 10.0, 5.0, 20.0, COLORS["red"])
    c = SceneObject("green", "triangle", 50.0, 30.0, 20.0, COLORS["green"])
    scene = Scene(100, 240, True, (c, a, b))
    assert caption(scene) == "a red circle, a blue square and a green triangle"
    assert caption(Scene(100, 240, True, (a, b))) == "a red circle and a blue square"
    assert caption(Scene(100, 240, True, (c,))) == "a green triangle"
    assert ask(scene, "caption", np.random.default_rng(0)) == ("Describe the image.", caption(scene))


def test_ask_refuses_ambiguous() -> None:
    rng = np.random.default_rng(0)
    circles = Scene(
        100,
        240,
        False,
        tuple(
            SceneObject(c, "circle", x, 0.0, 25.0, COLORS[c])
            for c, x in [("red", 0.0), ("blue", 30.0), ("green", 60.0)]
        ),
    )
    assert ask(circles, "color", rng) is None
    reds = Scene(
        100,
        240,
        False,
        tuple(SceneObject("red", s, x, 0.0, 25.0, COLORS["red"]) for s, x in [("circle", 0.0), ("square", 30.0)]),
    )
    assert ask(reds, "shape", rng) is None
    assert ask(reds, "color", rng) in {("What color is the circle?", "red"), ("What color is the square?", "red")}


# --------------------------------------------------------------------------------------------------- grading


def test_grade() -> None:
    assert grade("red", "red")
    assert grade("  Red.\n", "red")
    assert grade("YES", "yes")
    assert grade("a red circle and a blue square.", "a red circle and a blue square")
    assert not grade("red..", "red")
    assert not grade("red circle", "red")
    assert not grade("the red", "red")
    assert not grade("", "red")


def test_score() -> None:
    items = [
        EvalItem(b"", "image/png", "How many shapes are there?", "two", "count"),
        EvalItem(b"", "image/png", "How many shapes are there?", "one", "count"),
        EvalItem(b"", "image/png", "Is there a red circle?", "yes", "exists"),
    ]
    result = score(items, ["Two.", "three", " yes"])
    assert result["n"] == 3 and result["correct"] == 2 and result["accuracy"] == pytest.approx(2 / 3)
    assert result["per_kind"]["count"] == {"accuracy": 0.5, "correct": 1, "n": 2}
    assert result["per_kind"]["exists"] == {"accuracy": 1.0, "correct": 1, "n": 1}
    assert set(result["per_kind"]) == set(KINDS) and math.isnan(result["per_kind"]["color"]["accuracy"])
    with pytest.raises(ValueError):
        score(items, ["two"])


def test_each_kinds_answer_schema_accepts_exactly_its_answers() -> None:
    """`eval --json-schema` constrains each answer to its kind's schema: every true answer must be allowed."""
    import jsonschema

    from vlmserve.training.evaluate import answer_schema, eval_items

    items = eval_items(300, 7)
    for item in items:
        jsonschema.validate(item.answer, answer_schema(item.kind))
    others = {it.kind: it.answer for it in items}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(others["caption"], answer_schema("color"))
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate("a red circle and", answer_schema("caption"))


def test_eval_url_scores_a_live_server(live_server, capsys: pytest.CaptureFixture[str]) -> None:
    """`eval --url` asks the server through vlmserve_client (plain and `--json-schema`); an error answer is one
    line on stderr and exit status 1."""
    from vlmserve.training.cli import eval_main
    from vlmserve.training.evaluate import eval_items, evaluate_url
    from vlmserve_client import NotFoundError

    items = eval_items(5, 3)
    for json_schema in (False, True):
        result = evaluate_url(live_server.url, items, model="tiny-llava", workers=2, json_schema=json_schema)
        assert result["n"] == 5 and 0 <= result["correct"] <= 5 and "mistakes" in result and "per_kind" in result
    with pytest.raises(NotFoundError):
        evaluate_url(live_server.url, items[:1], model="nope")
    assert eval_main(["--url", live_server.url, "--served-model", "nope", "--n", "2"]) == 1
    err = capsys.readouterr().err
    assert "vlmserve eval: HTTP 404" in err and "nope" in err
