"""Smoke tests of the SHAPES training pipeline: the world generator, the text side, every stage (losses fall), resume,
and the exported directory (loads in vlmserve and in transformers with equal logits, and answers through generate)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from vlmserve.model.generation import generate
from vlmserve.model.image_decode import open_image
from vlmserve.model.weights import load_model
from vlmserve.training import world
from vlmserve.training.cli import eval_main, train_main
from vlmserve.training.evaluate import LocalAnswerer, eval_items
from vlmserve.training.loop import train_loop
from vlmserve.training.recipe import SMOKE, StageBudget
from vlmserve.training.tokenizer import PromptCodec


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("smoke-run")
    assert train_main(["--out", str(out), "--config", "smoke"]) == 0
    return out


def test_world_follows_the_spec() -> None:
    rng = random.Random(0)
    for _ in range(200):
        w = world.random_world(rng)
        assert 64 <= w.size <= 256 and 225 <= w.grey <= 255 and 1 <= len(w.shapes) <= 3
        assert len({(s.color, s.shape) for s in w.shapes}) == len(w.shapes)
        for s in w.shapes:
            assert 0.2 * w.size - 1e-9 <= s.side <= 0.35 * w.size + 1e-9
            assert s.x >= 0 and s.x + s.side <= w.size and s.y >= 0 and s.y + s.side <= w.size
            assert all(abs(c - n) <= 15 for c, n in zip(s.rgb, world.COLOR_RGB[s.color], strict=True))
        image = world.render(w, rng)
        assert image.size == (w.size, w.size) and image.mode == "RGB"
    a = world.random_world(random.Random(5))
    assert a == world.random_world(random.Random(5))


def test_questions_and_caption_order() -> None:
    shapes = (
        world.Shape("blue", "square", 50, 10, 20, (40, 80, 220)),
        world.Shape("red", "circle", 10, 40, 20, (220, 40, 40)),
        world.Shape("green", "triangle", 50, 60, 20, (40, 170, 60)),
    )
    w = world.World(100, 240, False, shapes)
    assert world.caption(w) == "a red circle, a blue square and a green triangle"
    rng = random.Random(0)
    assert world.question_for(w, "count", rng) == ("How many shapes are there?", "three")
    q, a = world.question_for(w, "color", rng)  # type: ignore[misc]
    assert q.startswith("What color is the ") and a in world.COLORS
    labels = world.patch_labels(w, 10)
    assert labels.rank[2, 6] == 2 and labels.rank[5, 2] == 1 and labels.count == 2
    assert labels.pair[2, 6] == world.PAIRS.index(("blue", "square")) + 1


def test_prompt_codec_matches_the_full_conversation(smoke_run: Path) -> None:
    from vlmserve.model.tokenizer import ChatTokenizer

    chat = ChatTokenizer.from_pretrained(smoke_run / "model")
    codec = PromptCodec(chat, 16)
    q, a = "Describe the image.", "a red circle and a blue square"
    full = chat.encode_chat(codec.messages(q, a), num_image_tokens=16, add_generation_prompt=False).input_ids
    assert full == codec.prompt(q) + codec.answer(a)
    assert codec.prompt(q).count(codec.image_token_id) == 16 and codec.answer(a)[-1] == codec.eos_id
    assert codec.decode(codec.answer(a)).strip() == a


def test_every_stage_loss_falls(smoke_run: Path) -> None:
    summary = json.loads((smoke_run / "summary.json").read_text())
    for stage in ("vision", "lm", "align", "instruct"):
        curve = summary[f"stage_{stage}"]["curve"]
        assert curve[-1] < curve[0], (stage, curve)


def test_exported_model_loads_in_vlmserve_and_transformers(smoke_run: Path) -> None:
    from transformers import LlavaForConditionalGeneration

    model_dir = smoke_run / "model"
    ours = load_model(model_dir)
    theirs = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    answer = LocalAnswerer(model_dir, model=ours)
    item = eval_items(1, 0)[0]
    pixels = answer.processor([open_image(item.image, max_pixels=1 << 24)])  # (1, 3, H, W)
    ids = answer.chat.encode_chat(PromptCodec.messages(item.question), num_image_tokens=ours.config.num_visual_tokens)
    x = torch.tensor([ids.input_ids])  # (1, T)
    with torch.no_grad():
        ours_logits = ours(x, pixel_values=pixels)  # (1, T, V)
        hf_logits = theirs(input_ids=x, pixel_values=pixels).logits  # (1, T, V)
    torch.testing.assert_close(ours_logits, hf_logits, rtol=1e-4, atol=1e-4)
    tokens = list(generate(ours, ids.input_ids, pixel_values=pixels, max_new_tokens=8,
                           eos_token_ids=answer.chat.eos_token_ids))
    assert 1 <= len(tokens) <= 8
    assert isinstance(answer(item.image, item.question), str)
    files = {p.name for p in model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json",
            "preprocessor_config.json", "processor_config.json"} <= files


def test_eval_cli_prints_per_kind_accuracy(smoke_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert eval_main(["--model", str(smoke_run / "model"), "--n", "5", "--seed", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 5 and set(result["per_kind"]) >= {"color", "shape", "count", "exists", "caption"}


def test_resume_skips_finished_stages(smoke_run: Path) -> None:
    before = (smoke_run / "summary.json").read_text()
    assert train_main(["--out", str(smoke_run), "--config", "smoke", "--stage", "lm", "--resume"]) == 0
    assert (smoke_run / "summary.json").read_text() == before


def test_train_loop_resumes_mid_stage(tmp_path: Path) -> None:
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 1)
    budget = StageBudget(steps=6, batch=2, lr=1e-2, warmup=1, checkpoint_every=3, log_every=3)
    seen: list[int] = []

    def step(i: int) -> tuple[torch.Tensor, int]:
        if i == 4 and not seen.count(-1):
            seen.append(-1)
            raise KeyboardInterrupt
        seen.append(i)
        return layer(torch.ones(2, 4)).pow(2).mean(), 2

    with pytest.raises(KeyboardInterrupt):
        train_loop("t", tmp_path, {"layer": layer}, [{"params": list(layer.parameters())}], budget, step)
    out = train_loop("t", tmp_path, {"layer": layer}, [{"params": list(layer.parameters())}], budget, step)
    assert seen == [0, 1, 2, 3, -1, 3, 4, 5] and out["steps"] == 6


def test_smoke_recipe_is_small() -> None:
    assert SMOKE.vision.steps <= 50 and SMOKE.instruct.steps <= 50
