"""Image budgets per request through real HTTP: OpenAI's `image_url.detail`, our `max_image_tokens`, the `detail`
form field of /v1/generate and `input_image.detail` of the Responses API, and --max-mm-tokens-per-request. The
llava-1.5 family has one resolution, so every `detail` gives the checkpoint's visual tokens; a budget below them, or a
request past the per-request cap, is a 400 with the numbers, refused before any image is decoded."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from live_server import LiveServer, start_server
from PIL import Image

MODEL = "tiny-llava"
VISUAL_TOKENS = 16  # the tiny CLIP's (32 / 8) ** 2 patches


def png(color: tuple[int, int, int]) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), color).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


RED, GREEN = png((200, 10, 10)), png((10, 200, 10))
NOT_AN_IMAGE = "data:image/png;base64," + base64.b64encode(b"not a png at all").decode()


def chat(server: LiveServer, *images: dict[str, Any]) -> httpx.Response:
    content = [*({"type": "image_url", "image_url": image} for image in images), {"type": "text", "text": "hi"}]
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 2, "temperature": 0}
    return httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30)


def image_tokens(response: httpx.Response) -> int:
    assert response.status_code == 200, response.text
    return response.json()["usage"]["prompt_tokens_details"]["image_tokens"]


@pytest.mark.parametrize("detail", ["low", "high", "auto", None])
def test_every_detail_gives_the_checkpoints_visual_tokens(live_server: LiveServer, detail: str | None) -> None:
    assert image_tokens(chat(live_server, {"url": RED, "detail": detail})) == VISUAL_TOKENS
    enough = {"url": RED, "detail": detail, "max_image_tokens": VISUAL_TOKENS}
    assert image_tokens(chat(live_server, enough, {"url": GREEN})) == 2 * VISUAL_TOKENS


def test_a_budget_below_the_images_tokens_is_refused_before_decoding(live_server: LiveServer) -> None:
    # The image bytes are not even an image: the budget is refused first, from the numbers alone.
    r = chat(live_server, {"url": RED}, {"url": NOT_AN_IMAGE, "max_image_tokens": VISUAL_TOKENS - 1})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "messages.0.content.1.image_url"
    assert str(VISUAL_TOKENS) in error["message"] and str(VISUAL_TOKENS - 1) in error["message"]
    for junk in ({"url": RED, "detail": "medium"}, {"url": RED, "max_image_tokens": 0},
                 {"url": RED, "max_image_tokens": "many"}):
        assert chat(live_server, junk).status_code == 400


def test_generate_and_responses_honour_detail(live_server: LiveServer) -> None:
    raw = base64.b64decode(RED.split(",", 1)[1])
    for detail, status in (("low", 200), ("high", 200), ("auto", 200), ("tiny", 400)):
        r = httpx.post(live_server.url + "/v1/generate", timeout=30,
                       data={"prompt": "hi", "max_tokens": "2", "detail": detail},
                       files=[("image", ("a.png", raw, "image/png"))])
        assert r.status_code == status, r.text
        if status == 400:
            assert r.json()["error"]["param"] == "detail"
    body = {"model": MODEL, "max_output_tokens": 2, "input": [{"role": "user", "content": [
        {"type": "input_image", "image_url": RED, "detail": "low"}, {"type": "input_text", "text": "hi"}]}]}
    assert httpx.post(live_server.url + "/v1/responses", json=body, timeout=30).status_code == 200
    body["input"][0]["content"][0]["detail"] = "tiny"
    assert httpx.post(live_server.url + "/v1/responses", json=body, timeout=30).status_code == 400


@pytest.fixture(scope="module")
def capped(checkpoint_factory: Callable[[str], Path],
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """At most one image's visual tokens per request (and a little more)."""
    server = start_server(checkpoint_factory("clip-llama"), tmp_path_factory.mktemp("mm-cap"), "--served-model-name",
                          MODEL, "--max-mm-tokens-per-request", str(VISUAL_TOKENS + 4))
    yield server
    server.stop()


def test_the_per_request_visual_token_cap(capped: LiveServer) -> None:
    assert image_tokens(chat(capped, {"url": RED})) == VISUAL_TOKENS
    r = chat(capped, {"url": RED}, {"url": NOT_AN_IMAGE})  # refused from the numbers: the bad image is never read
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "too_many_image_tokens"
    assert f"{2 * VISUAL_TOKENS} visual tokens" in error["message"] and str(VISUAL_TOKENS + 4) in error["message"]
    ollama = httpx.post(capped.url + "/api/chat", timeout=30, json={
        "model": MODEL, "stream": False, "messages": [{"role": "user", "content": "hi", "images": [
            RED.split(",", 1)[1], GREEN.split(",", 1)[1]]}]})
    assert ollama.status_code == 400 and "visual tokens" in ollama.json()["error"]
