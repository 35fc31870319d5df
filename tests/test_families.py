"""The VLM families beyond llava-1.5, each against transformers on a tiny random checkpoint built with its own classes
and processor: pixels, token layouts and greedy answers through the HTTP API, image budgets, hostile images, and
checkpoints in both directions. One file, parametrized by family (issue 11)."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from checkpoints import FAMILY_SPECS, build_checkpoint
from live_server import LiveServer, start_server
from PIL import Image
from transformers import AutoProcessor, LlavaNextForConditionalGeneration

from vlmserve.model.images import ImageProcessor
from vlmserve.model.weights import load_model, save_model


@dataclass(frozen=True)
class Family:
    spec: str
    hf_class: type
    low_tokens: int  # visual tokens of any image at detail low


FAMILIES = {"llava-next": Family("llava-next", LlavaNextForConditionalGeneration, 4 * 4 + 1)}
SIZES = [(40, 90), (100, 30), (32, 32), (250, 240), (1, 1), (1, 400), (400, 1), (7, 200)]  # (height, width)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Family, Path]:
    fam = FAMILIES[request.param]
    return fam, build_checkpoint(FAMILY_SPECS[fam.spec], tmp_path_factory.mktemp(fam.spec))


@pytest.fixture(scope="module")
def hf(family: tuple[Family, Path]) -> tuple[Any, Any]:
    fam, ckpt = family
    return fam.hf_class.from_pretrained(ckpt).eval(), AutoProcessor.from_pretrained(ckpt)


@pytest.fixture(scope="module")
def server(family: tuple[Family, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    s = start_server(family[1], tmp_path_factory.mktemp("family-logs"), "--served-model-name", "fam",
                     "--max-running", "8", "--max-image-pixels", "200000")
    yield s
    s.stop()


def picture(height: int, width: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def chat(question: str, images: list[Image.Image], detail: str | None = None, **extra: Any) -> dict[str, Any]:
    parts: list[dict[str, Any]] = []
    for im in images:
        url: dict[str, Any] = {"url": "data:image/png;base64," + base64.b64encode(png(im)).decode()}
        if detail is not None:
            url["detail"] = detail
        url.update(extra)
        parts.append({"type": "image_url", "image_url": url})
    parts.append({"type": "text", "text": question})
    return {"model": "fam", "messages": [{"role": "user", "content": parts}], "max_tokens": 12, "temperature": 0}


def hf_answer(hf: tuple[Any, Any], question: str, images: list[Image.Image], *, low: bool = False,
              max_new_tokens: int = 12) -> tuple[str, int]:
    """transformers' greedy answer and prompt length. `low`: every image as its base tile only, through
    transformers' own single-tile branch of `pack_image_features` and the LM on the merged embeddings."""
    model, processor = hf
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": question}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    if not low:
        inputs = processor(images=images, text=[prompt], return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        n = inputs["input_ids"].shape[1]
        return processor.tokenizer.decode(out[0, n:], skip_special_tokens=True), n
    pixels = processor.image_processor(images=images, return_tensors="pt")["pixel_values"][:, :1]  # (N, 1, C, H, W)
    image_token = processor.image_token
    per_image = model.config.vision_config.image_size // model.config.vision_config.patch_size
    text = prompt.replace(image_token, image_token * (per_image**2 + 1))
    ids = processor.tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        hidden = model.model.vision_tower(pixels.flatten(0, 1), output_hidden_states=True).hidden_states
        feats = model.model.multi_modal_projector(hidden[model.config.vision_feature_layer][:, 1:])  # (N, S*S, D)
        packed, _ = model.model.pack_image_features(list(feats[:, None]), torch.tensor([[1, 1]] * len(images)),
                                                    "default", model.model.image_newline)
        embeds = model.get_input_embeddings()(ids.masked_fill(ids == model.config.image_token_index, 0))
        mask = (ids == model.config.image_token_index)[..., None]
        embeds = embeds.masked_scatter(mask, torch.cat(packed))
        out = model.generate(input_ids=ids, inputs_embeds=embeds, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True), ids.shape[1]


# -- preprocessing ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES)
def test_pixels_and_token_counts_equal_transformers(family: tuple[Family, Path], hf: tuple[Any, Any],
                                                    size: tuple[int, int]) -> None:
    _, ckpt = family
    model, processor = hf
    ours = load_model(ckpt)
    assert ours.anyres is not None
    image = picture(*size, seed=size[0] * 7 + size[1])
    want = processor.image_processor(images=[image], return_tensors="pt")
    layout = ours.anyres.layout(*size)
    got = ImageProcessor.from_pretrained(ckpt).preprocess_tiled(image, layout, ours.anyres.tile)
    assert torch.equal(got, want["pixel_values"][0][: got.shape[0]])  # bit for bit (the rest is batch padding)
    text = processor(images=[image], text=["<image>"], return_tensors="pt")
    placeholders = int((text["input_ids"] == model.config.image_token_index).sum())
    assert ours.anyres.num_tokens(layout) == placeholders
    with torch.no_grad():
        theirs = model.model.get_image_features(pixel_values=want["pixel_values"], image_sizes=want["image_sizes"],
                                                return_dict=True).pooler_output[0]
        mine = ours.encode_tiled(got[None], [layout])[0]
    torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)


# -- through the HTTP API ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("sizes", [[(40, 90)], [(100, 30)], [(250, 240)], [(1, 400)], [(40, 90), (100, 30)]])
def test_greedy_answers_equal_transformers(server: LiveServer, hf: tuple[Any, Any],
                                           sizes: list[tuple[int, int]]) -> None:
    images = [picture(h, w, seed=i + h) for i, (h, w) in enumerate(sizes)]
    want, prompt_len = hf_answer(hf, "what is in the picture?", images)
    r = httpx.post(server.url + "/v1/chat/completions", json=chat("what is in the picture?", images), timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["message"]["content"] == want
    assert body["usage"]["prompt_tokens"] == prompt_len


def test_detail_low_and_high_are_both_exact(server: LiveServer, hf: tuple[Any, Any],
                                            family: tuple[Family, Path]) -> None:
    fam, _ = family
    image = picture(250, 240, seed=5)
    counts = {}
    for detail in ("low", "high", "auto"):
        r = httpx.post(server.url + "/v1/chat/completions", json=chat("describe it", [image], detail), timeout=60)
        assert r.status_code == 200, r.text
        want, prompt_len = hf_answer(hf, "describe it", [image], low=detail == "low")
        assert r.json()["choices"][0]["message"]["content"] == want, detail
        assert r.json()["usage"]["prompt_tokens"] == prompt_len
        counts[detail] = r.json()["usage"]["prompt_tokens_details"]["image_tokens"]
    assert counts["low"] == fam.low_tokens < counts["high"] == counts["auto"]
    # max_image_tokens between the two settings: the grid does not fit, the base tile does
    r = httpx.post(server.url + "/v1/chat/completions",
                   json=chat("describe it", [image], max_image_tokens=counts["high"] - 1), timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens_details"]["image_tokens"] == counts["low"]
    # /v1/generate's detail field, for all its images
    r = httpx.post(server.url + "/v1/generate", data={"prompt": "describe it", "detail": "low", "max_tokens": "4"},
                   files=[("image", ("a.png", png(image), "image/png"))], timeout=60)
    assert r.status_code == 200, r.text


def test_batched_answers_equal_alone(server: LiveServer) -> None:
    bodies = [chat(f"question {i}?", [picture(30 + 20 * i, 200 - 15 * i, seed=i)]) for i in range(6)]
    alone = [httpx.post(server.url + "/v1/chat/completions", json=b, timeout=60).json() for b in bodies]
    with ThreadPoolExecutor(6) as pool:
        together = list(pool.map(lambda b: httpx.post(server.url + "/v1/chat/completions", json=b, timeout=60).json(),
                                 bodies))
    assert [a["choices"][0]["message"]["content"] for a in alone] == \
        [t["choices"][0]["message"]["content"] for t in together]


# -- budgets and hostile images ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("extra", "status", "words"), [
    ({"detail": "ultra"}, 400, "detail"),
    ({"max_image_tokens": 3}, 400, "max_image_tokens 3"),
])
def test_budgets_refused_with_the_numbers(server: LiveServer, extra: dict[str, Any], status: int,
                                          words: str) -> None:
    body = chat("hi", [picture(50, 60)])
    body["messages"][0]["content"][0]["image_url"].update(extra)
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == status and words in r.json()["error"]["message"], r.text


def test_hostile_sizes(server: LiveServer) -> None:
    for size in [(1, 4000), (4000, 1), (1, 1)]:
        r = httpx.post(server.url + "/v1/chat/completions", json=chat("hi", [picture(*size)]), timeout=60)
        assert r.status_code == 200, (size, r.text)
    huge = picture(1000, 1000)  # 1 MP over the server's --max-image-pixels 200000: refused from the header
    r = httpx.post(server.url + "/v1/chat/completions", json=chat("hi", [huge]), timeout=30)
    assert r.status_code in (400, 413) and "pixels" in r.json()["error"]["message"]
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200


def test_mm_token_cap_counts_the_real_tokens(family: tuple[Family, Path], tmp_path: Path) -> None:
    fam, ckpt = family
    s = start_server(ckpt, tmp_path, "--served-model-name", "fam", "--max-mm-tokens-per-request",
                     str(fam.low_tokens * 2))
    try:
        two_low = chat("hi", [picture(50, 60), picture(60, 50)], detail="low")
        assert httpx.post(s.url + "/v1/chat/completions", json=two_low, timeout=60).status_code == 200
        r = httpx.post(s.url + "/v1/chat/completions", json=chat("hi", [picture(50, 60)], detail="high"), timeout=30)
        assert r.status_code == 400 and "--max-mm-tokens-per-request" in r.json()["error"]["message"]
    finally:
        s.stop()


# -- checkpoints -------------------------------------------------------------------------------------------------


def test_our_saves_load_in_transformers(family: tuple[Family, Path], hf: tuple[Any, Any], tmp_path: Path) -> None:
    fam, ckpt = family
    ours = load_model(ckpt)
    out = save_model(ours, tmp_path / "saved", copy_from=ckpt)
    reloaded = fam.hf_class.from_pretrained(out).eval()
    model, processor = hf
    image = picture(100, 30)
    inputs = processor(images=[image], text=["<image> hello"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, model(**inputs).logits)


def test_transformers_in_memory_key_names_load(family: tuple[Family, Path], hf: tuple[Any, Any],
                                               tmp_path: Path) -> None:
    """A checkpoint written under transformers 5's module names (`model.language_model.*`, `model.image_newline`,
    `lm_head.*`) loads to the same model as the classic layout the Hub holds."""
    import shutil

    from safetensors.torch import save_file

    _, ckpt = family
    model, _ = hf
    target = tmp_path / "in-memory"
    shutil.copytree(ckpt, target)
    (target / "model.safetensors").unlink()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(target / "model.safetensors"))
    assert any(k.startswith("model.image_newline") for k in model.state_dict())
    a, b = load_model(ckpt).state_dict(), load_model(target).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- bfloat16 ----------------------------------------------------------------------------------------------------


def test_bfloat16_agrees_with_transformers_within_its_rounding(family: tuple[Family, Path]) -> None:
    """Greedy tokens in bf16 (our engine, the compiled decode step and the C++ decode attention as served) equal
    transformers' in bf16, or part from them only where transformers' own top two logits are within bf16's
    rounding of each other."""
    from vlmserve.model.sampling import SamplingParams
    from vlmserve.model.tokenizer import ChatTokenizer
    from vlmserve.server.engine import Engine, EngineConfig, Finished
    from vlmserve.server.engine.prepare import RequestPreparer

    fam, ckpt = family
    model = load_model(ckpt, dtype=torch.bfloat16)
    tokenizer = ChatTokenizer.from_pretrained(ckpt)
    preparer = RequestPreparer(tokenizer, ImageProcessor.from_pretrained(ckpt), model.config.num_visual_tokens,
                               anyres=model.anyres)
    engine = Engine(model, tokenizer, EngineConfig(compile=False), model_id="bf16").start()
    hf_model = fam.hf_class.from_pretrained(ckpt, dtype=torch.bfloat16).eval()
    processor = AutoProcessor.from_pretrained(ckpt)
    try:
        exact = 0
        for i, size in enumerate([(40, 90), (100, 30), (250, 240)]):
            image = picture(*size, seed=i)
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is it?"}]}]
            req = preparer.request(f"bf16-{i}", messages, [png(image)], sampling=SamplingParams(temperature=0),
                                   max_tokens=10)
            final = list(engine.generate(req))[-1]
            assert isinstance(final, Finished)
            prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
            inputs = processor(images=[image], text=[prompt], return_tensors="pt")
            assert inputs["input_ids"][0].tolist() == req.prompt_ids
            inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
            with torch.no_grad():
                want = hf_model.generate(**inputs, max_new_tokens=10, do_sample=False)[0, len(req.prompt_ids):]
            got = list(final.token_ids)
            for k, (a, b) in enumerate(zip(got, want.tolist(), strict=False)):
                if a != b:
                    ids = torch.cat([inputs["input_ids"], want[None, :k]], dim=1)
                    with torch.no_grad():
                        logits = hf_model(**{**inputs, "input_ids": ids}).logits[0, -1].float()
                    # bf16 keeps 8 significant bits; over the layers two kernels' sums drift apart by a few of its
                    # steps at the logits' scale (2^-5 of the largest: four to eight steps)
                    assert (logits[a] - logits[b]).abs() <= 2**-5 * logits.abs().max(), (i, k)
                    break
            else:
                exact += 1
        assert exact >= 1
    finally:
        engine.shutdown(timeout=5)
