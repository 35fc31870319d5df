"""The VLM families beyond llava-1.5, each against transformers on a tiny random checkpoint built with its own classes
and processor: pixels, token layouts and greedy answers through the HTTP API, image budgets, hostile images, and
checkpoints in both directions. One file, parametrized by family (issue 11)."""

from __future__ import annotations

import base64
import io
import json
import shutil
import time
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
from family_oracles import (
    Gemma3Oracle,
    Idefics3Oracle,
    LlavaNextOracle,
    LlavaOnevisionOracle,
    Oracle,
    Qwen2VLOracle,
    Qwen25VLOracle,
    messages,
)
from fastapi.testclient import TestClient
from live_server import LiveServer, start_server
from PIL import Image
from safetensors.torch import save_file

from vlmserve.model.images import ImageProcessor
from vlmserve.model.sampling import SamplingParams
from vlmserve.model.tokenizer import ChatTokenizer
from vlmserve.model.weights import load_model, save_model
from vlmserve.server.api import create_app
from vlmserve.server.engine import Engine, EngineConfig, Finished
from vlmserve.server.engine.prepare import RequestPreparer
from vlmserve.server.settings import Settings


@dataclass(frozen=True)
class Family:
    spec: str
    oracle: type[Oracle]
    max_aspect: float | None = None  # the processor refuses images past this aspect ratio (a 400)
    lm_prefix: str = "model.language_model."  # the LM's keys in transformers 5's module names
    auto: str = "high"  # the `detail` that `auto` (the checkpoint processor's defaults) is on the tiny checkpoint
    detail_size: tuple[int, int] = (250, 240)  # (height, width) of an image that `low` and `high` make different


FAMILIES = {
    "llava-next": Family("llava-next", LlavaNextOracle),
    "llava-onevision": Family("llava-onevision", LlavaOnevisionOracle),
    "qwen2-vl": Family("qwen2-vl", Qwen2VLOracle, max_aspect=200),
    "qwen2.5-vl": Family("qwen2.5-vl", Qwen25VLOracle, max_aspect=200),
    "idefics3": Family("idefics3", Idefics3Oracle, lm_prefix="model.text_model."),
    "gemma3": Family("gemma3", Gemma3Oracle, auto="low", detail_size=(60, 150)),  # pan and scan: crops if wide
}
SIZES = [(40, 90), (100, 30), (32, 32), (250, 240), (1, 1), (1, 150), (400, 1), (7, 200)]  # (height, width)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Family, Path]:
    fam = FAMILIES[request.param]
    return fam, build_checkpoint(FAMILY_SPECS[fam.spec], tmp_path_factory.mktemp(fam.spec))


@pytest.fixture(scope="module")
def oracle(family: tuple[Family, Path]) -> Oracle:
    fam, ckpt = family
    return fam.oracle(ckpt)


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


def ask(server: LiveServer, body: dict[str, Any]) -> dict[str, Any]:
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def decode(oracle: Oracle, ids: list[int]) -> str:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(oracle.ckpt).decode(ids, skip_special_tokens=True)


# -- preprocessing ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES)
def test_pixels_features_and_token_counts_equal_transformers(family: tuple[Family, Path], oracle: Oracle,
                                                             size: tuple[int, int]) -> None:
    fam, _ = family
    if fam.max_aspect is not None and max(size) / min(size) > fam.max_aspect:
        pytest.skip("past the family's aspect limit (a 400: test_hostile_sizes)")
    oracle.check_pixels(picture(*size, seed=size[0] * 7 + size[1]))


# -- through the HTTP API ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("sizes", [[(40, 90)], [(100, 30)], [(250, 240)], [(7, 200)], [(40, 90), (100, 30)]])
def test_greedy_answers_equal_transformers(server: LiveServer, oracle: Oracle, sizes: list[tuple[int, int]]) -> None:
    images = [picture(h, w, seed=i + h) for i, (h, w) in enumerate(sizes)]
    want, prompt_len = oracle.answer("what is in the picture?", images)
    body = ask(server, chat("what is in the picture?", images))
    assert body["choices"][0]["message"]["content"] == decode(oracle, want)
    assert body["usage"]["prompt_tokens"] == prompt_len
    assert body["usage"]["completion_tokens"] == len(want)


def test_first_token_logprobs_equal_transformers(server: LiveServer, oracle: Oracle) -> None:
    """The prompt's last logits, not only its argmax: the top log-probabilities of the first answer token equal
    transformers' to float32 rounding (a mask one key off, Gemma 3's bidirectional image spans or its window, moves
    them by far more than this). `detail` high: Gemma 3 cuts both images into crops, each view a span of its own."""
    images = [picture(60, 50, seed=3), picture(30, 70, seed=4)]
    body = chat("what is in the picture?", images, "high")
    body.update(max_tokens=1, logprobs=True, top_logprobs=5)
    got = ask(server, body)["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
    with torch.no_grad():
        want = torch.log_softmax(oracle.next_logits(oracle.inputs("what is in the picture?", images, "high"), []),
                                 dim=-1)
    top = torch.topk(want, len(got)).values  # (5,) the same ranks' values (ties or not)
    assert max(abs(e["logprob"] - float(v)) for e, v in zip(got, top, strict=True)) < 1e-4, (got, top)


def test_detail_low_and_high_are_both_exact(server: LiveServer, oracle: Oracle, family: tuple[Family, Path]) -> None:
    """Every `detail` token-exact, `low` fewer tokens than `high` (Gemma 3: one view against the image and its
    pan-and-scan crops), `image_tokens` the prompt's image tokens as transformers' processor lays them out."""
    fam, _ = family
    image = picture(*fam.detail_size, seed=5)
    bodies, counts = {}, {}
    for detail in ("low", "high", "auto"):
        bodies[detail] = body = ask(server, chat("describe it", [image], detail))
        want, prompt_len = oracle.answer("describe it", [image], detail)
        assert body["choices"][0]["message"]["content"] == decode(oracle, want), detail
        assert body["usage"]["prompt_tokens"] == prompt_len
        counts[detail] = body["usage"]["prompt_tokens_details"]["image_tokens"]
        assert counts[detail] == oracle.image_tokens(oracle.inputs("describe it", [image], detail)), detail
    assert counts["low"] < counts["high"] and counts["auto"] == counts[fam.auto]
    # a max_image_tokens below the most's count: the image takes a setting within it
    capped = ask(server, chat("describe it", [image], "high", max_image_tokens=counts["high"] - 1))
    assert counts["low"] <= capped["usage"]["prompt_tokens_details"]["image_tokens"] < counts["high"]
    # /v1/generate's detail field, for all its images
    r = httpx.post(server.url + "/v1/generate", data={"prompt": "describe it", "detail": "low", "max_tokens": "4"},
                   files=[("image", ("a.png", png(image), "image/png"))], timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] < bodies["high"]["usage"]["prompt_tokens"]


def test_batched_answers_equal_alone(server: LiveServer) -> None:
    bodies = [chat(f"question {i}?", [picture(30 + 20 * i, 200 - 15 * i, seed=i)]) for i in range(6)]
    alone = [ask(server, b)["choices"][0]["message"]["content"] for b in bodies]
    with ThreadPoolExecutor(6) as pool:
        together = list(pool.map(lambda b: ask(server, b)["choices"][0]["message"]["content"], bodies))
    assert alone == together


def test_repeated_image_reuses_its_tokens_and_blocks(server: LiveServer) -> None:
    """A second question about the same image: the same answer as cold, the prompt's image served from cache."""
    image = picture(120, 90, seed=9)
    first = ask(server, chat("first?", [image]))
    again = ask(server, chat("first?", [image]))
    assert again["choices"][0]["message"]["content"] == first["choices"][0]["message"]["content"]
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] > 0


# -- budgets and hostile images ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("extra", "words"), [({"detail": "ultra"}, "detail"), ({"max_image_tokens": 0}, "max_image"),
                                               ({"max_image_tokens": 3}, "3 is below")])
def test_budgets_refused_with_the_numbers(server: LiveServer, family: tuple[Family, Path], extra: dict[str, Any],
                                          words: str) -> None:
    if extra.get("max_image_tokens") == 3 and family[0].spec.startswith("qwen"):
        pytest.skip("Qwen2-VL fits any budget: its smallest setting is one visual token (max_pixels wins)")
    body = chat("hi", [picture(50, 60)])
    body["messages"][0]["content"][0]["image_url"].update(extra)
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400 and words in r.json()["error"]["message"], r.text


def test_hostile_sizes(server: LiveServer, family: tuple[Family, Path]) -> None:
    fam, _ = family
    for size in [(1, 4000), (4000, 1), (1, 1)]:
        r = httpx.post(server.url + "/v1/chat/completions", json=chat("hi", [picture(*size)]), timeout=60)
        refused = fam.max_aspect is not None and max(size) / min(size) > fam.max_aspect
        assert r.status_code == (400 if refused else 200), (size, r.text)
        if refused:
            assert "aspect ratio" in r.json()["error"]["message"]
    huge = picture(1000, 1000)  # 1 MP over the server's --max-image-pixels 200000: refused from the header
    r = httpx.post(server.url + "/v1/chat/completions", json=chat("hi", [huge]), timeout=30)
    assert r.status_code in (400, 413) and "pixels" in r.json()["error"]["message"]
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200


def test_pan_and_scan_checkpoint_settings_and_cache_keys(family: tuple[Family, Path], tmp_path: Path) -> None:
    """Gemma 3: a checkpoint whose processor turns pan and scan on (with settings of its own) loads, and its `auto`
    and `high` cut every image as transformers' image processor does by itself (`low`: one view); the views' cache
    keys follow their pixels."""
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    fam, ckpt = family
    if fam.spec != "gemma3":
        pytest.skip("pan and scan is Gemma 3's; the other checkpoints' `auto` is their `high` (tested above)")
    target = tmp_path / "pan-and-scan"
    shutil.copytree(ckpt, target)
    path = target / "processor_config.json"
    config = json.loads(path.read_text())
    config["image_processor"].update(do_pan_and_scan=True, pan_and_scan_max_num_crops=2,
                                     pan_and_scan_min_ratio_to_activate=1.5)
    path.write_text(json.dumps(config))
    processor = ImageProcessor.from_pretrained(target)
    tokens = load_model(target).config.num_visual_tokens
    preparer = RequestPreparer(ChatTokenizer.from_pretrained(target), processor, tokens)
    theirs = Gemma3ImageProcessorPil.from_pretrained(target)  # its own settings: no kwargs
    assert theirs.do_pan_and_scan and theirs.pan_and_scan_max_num_crops == 2
    for size in [(60, 150), (40, 55), (150, 30)]:  # 2 crops (of 3 at the default 4), none (ratio 1.375), 2 (of 5)
        image = picture(*size, seed=size[1])
        want = theirs(images=[image], return_tensors="pt")
        auto = preparer.plan("auto", size=size)
        assert len(auto.crops) == int(want["num_crops"][0]) and preparer.plan("high", size=size) == auto
        views = processor.preprocess_views(image, auto.crops)
        assert all(torch.equal(g, w) for g, w in zip(views, want["pixel_values"], strict=True)), size
        assert preparer.plan("low", size=size).views == 1
    assert [len(preparer.plan("auto", size=s).crops) for s in [(60, 150), (40, 55), (150, 30)]] == [2, 0, 2]
    # the caches' keys: the whole image's the same with pan and scan or without (the same pixels), a crop's naming
    # its box, so that settings cutting other crops (here 3 of 50 px, and 2 of 75 px within 48 tokens) share none
    ours = RequestPreparer(preparer.tokenizer, ImageProcessor.from_pretrained(ckpt), tokens)
    plans = [ours.plan(detail, budget, (60, 150)) for detail, budget in [("low", None), ("high", None), ("high", 48)]]
    assert [p.views for p in plans] == [1, 4, 3]
    keys = [[ours.image_key("digest", p, v) for v in range(p.views)] for p in plans]
    assert keys[0][0] == keys[1][0] == keys[2][0] and not set(keys[1][1:]) & set(keys[2][1:])


def test_mm_token_cap_counts_the_real_tokens(family: tuple[Family, Path], server: LiveServer) -> None:
    fam, ckpt = family
    images = [picture(*fam.detail_size)]  # `low` fewer tokens than `high` in every family (one image: OneVision
    # makes every image of a multi-image prompt one tile whatever the detail)
    low = ask(server, chat("hi", images, detail="low"))["usage"]["prompt_tokens_details"]["image_tokens"]
    # The capped server is the whole app in this process (starlette's TestClient: middleware, routes, lifespan,
    # engine thread as served, as tests/test_audio.py does), not a second subprocess per family: its start-up costs
    # a model load, not a Python and torch start. A small KV pool: an app's engine stays in the process after it.
    settings = Settings(model=str(ckpt), served_model_name="fam", max_mm_tokens_per_request=low, compile=False,
                        no_ui=True, kv_cache_mb=32)
    with TestClient(create_app(settings)) as s:
        deadline = time.monotonic() + 120
        while s.get("/ready").status_code != 200:
            assert time.monotonic() < deadline, "the capped server did not get ready"
            time.sleep(0.05)
        assert s.post("/v1/chat/completions", json=chat("hi", images, detail="low")).status_code == 200
        r = s.post("/v1/chat/completions", json=chat("hi", images, detail="high"))
        assert r.status_code == 400 and "--max-mm-tokens-per-request" in r.json()["error"]["message"]


# -- checkpoints -------------------------------------------------------------------------------------------------


def test_our_saves_load_in_transformers(family: tuple[Family, Path], oracle: Oracle, tmp_path: Path) -> None:
    fam, ckpt = family
    out = save_model(load_model(ckpt), tmp_path / "saved", copy_from=ckpt)
    reloaded = fam.oracle(out)
    inputs = oracle.inputs("hello", [picture(100, 30)])
    with torch.no_grad():
        torch.testing.assert_close(reloaded.model(**inputs).logits, oracle.model(**inputs).logits)


def test_transformers_in_memory_key_names_load(family: tuple[Family, Path], oracle: Oracle, tmp_path: Path) -> None:
    """A checkpoint written under transformers 5's module names (`model.language_model.*`, `model.visual.*`,
    `model.image_newline`, `lm_head.*`) loads to the same model as the Hub layout."""
    fam, ckpt = family
    target = tmp_path / "in-memory"
    shutil.copytree(ckpt, target)
    (target / "model.safetensors").unlink()
    state = oracle.model.state_dict()
    assert any(k.startswith(fam.lm_prefix) for k in state)
    tied = oracle.model.lm_head.weight is oracle.model.get_input_embeddings().weight  # one tensor: saved once
    save_file({k: v.contiguous() for k, v in state.items() if not (tied and k == "lm_head.weight")},
              str(target / "model.safetensors"))
    a, b = load_model(ckpt).state_dict(), load_model(target).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- bfloat16 ----------------------------------------------------------------------------------------------------


def test_bfloat16_agrees_with_transformers_within_its_rounding(family: tuple[Family, Path]) -> None:
    """Greedy tokens in bf16 (our engine with the C++ decode attention, as served) equal transformers' in bf16, or
    part from them only where transformers' own top two logits are within bf16's rounding of each other."""
    fam, ckpt = family
    model = load_model(ckpt, dtype=torch.bfloat16)
    tokenizer = ChatTokenizer.from_pretrained(ckpt)
    preparer = RequestPreparer(tokenizer, ImageProcessor.from_pretrained(ckpt), model.config.num_visual_tokens,
                               anyres=model.anyres)
    engine = Engine(model, tokenizer, EngineConfig(compile=False), model_id="bf16").start()
    oracle = fam.oracle(ckpt, torch.bfloat16)
    try:
        exact = 0
        for i, size in enumerate([(40, 90), (100, 30), (250, 240)]):
            image = picture(*size, seed=i)
            req = preparer.request(f"bf16-{i}", messages(1, "what is it?"), [png(image)],
                                   sampling=SamplingParams(temperature=0), max_tokens=10)
            final = list(engine.generate(req))[-1]
            assert isinstance(final, Finished)
            inputs = oracle.inputs("what is it?", [image])
            assert oracle.served_ids(inputs) == req.prompt_ids
            want, _ = oracle.answer("what is it?", [image], max_new_tokens=10)
            got = list(final.token_ids)
            for k, (a, b) in enumerate(zip(got, want, strict=False)):
                if a != b:
                    with torch.no_grad():
                        logits = oracle.next_logits(inputs, want[:k])
                    # bf16 keeps 8 significant bits; over the layers two kernels' sums drift apart by a few of its
                    # steps at the logits' scale (2^-5 of the largest: four to eight steps)
                    assert (logits[a] - logits[b]).abs() <= 2**-5 * logits.abs().max(), (i, k)
                    break
            else:
                exact += 1
        assert exact >= 1
    finally:
        engine.shutdown(timeout=5)
