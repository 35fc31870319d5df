"""The HTTP server end to end: a real uvicorn process, driven by the `openai` SDK, httpx and the `vlmserve ask` CLI.

Most tests share the session's `live_server` (tiny CLIP + Llama served as `tiny-llava`). Settings that must differ
(API keys, small caps, remote images, a one-slot queue, a server to send SIGTERM to) get their own servers,
module-scoped where several tests can share them. Nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import base64
import http.server
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx
import openai
import pydantic
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from live_server import LiveServer, free_port, start_server
from PIL import Image

from vlmserve.server import remote_images
from vlmserve.server.remote_images import RemoteImageError, fetch_image, is_public_address
from vlmserve.server.streaming import sse

MODEL = "tiny-llava"
VISUAL_TOKENS = 16  # (32 / 8) ** 2 patches of the tiny CLIP, CLS dropped
CONTEXT = 256  # the tiny checkpoint's max_position_embeddings
API_KEYS = ("k1", "k2")
ERROR_KEYS = {"message", "type", "param", "code"}
LONG_PROMPT = "hi"  # with RED and temperature 0 the tiny model runs to the length limit (checked where it matters)


# ------------------------------------------------------------------------------------------------------- helpers
def png(color: tuple[int, int, int] = (200, 10, 10), size: tuple[int, int] = (40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def noise_png(size: int = 64) -> bytes:
    """A PNG that does not compress: several KB for a small picture."""
    buf = io.BytesIO()
    Image.frombytes("RGB", (size, size), os.urandom(size * size * 3)).save(buf, "PNG")
    return buf.getvalue()


RED, GREEN, BLUE = png((200, 10, 10)), png((10, 200, 10)), png((10, 10, 200))


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def image_part(data: bytes | str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": data if isinstance(data, str) else data_url(data)}}


def user(text: str, *images: bytes | str) -> dict[str, Any]:
    return {"role": "user", "content": [*(image_part(i) for i in images), {"type": "text", "text": text}]}


def chat_body(text: str = LONG_PROMPT, *images: bytes | str, **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [user(text, *(images or (RED,)))], "temperature": 0, **extra}


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    """The error object of a refusal, after checking the status and that the body has exactly the contract's shape."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == ERROR_KEYS, error
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    return error


def sse_data(lines: Iterator[str]) -> list[str]:
    """The payloads of `data:` lines, in order."""
    return [line[len("data: "):] for line in lines if line.startswith("data: ")]


def metric(text: str, name: str) -> float:
    """A metric's value in Prometheus text, summed over label sets."""
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith((name + " ", name + "{"))]
    assert values, f"{name} not in /metrics"
    return sum(values)


def metrics(server: LiveServer) -> str:
    r = httpx.get(server.url + "/metrics", timeout=10)
    assert r.status_code == 200
    return r.text


def poll(condition: Callable[[], bool], timeout: float = 10, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()


def post_chat(server: LiveServer, body: dict[str, Any] | bytes, *, key: str | None = None,
              headers: dict[str, str] | None = None, timeout: float = 30) -> httpx.Response:
    headers = {**({"Authorization": f"Bearer {key}"} if key else {}), **(headers or {})}
    if isinstance(body, bytes):
        headers["Content-Type"] = "application/json"
        return httpx.post(server.url + "/v1/chat/completions", content=body, headers=headers, timeout=timeout)
    return httpx.post(server.url + "/v1/chat/completions", json=body, headers=headers, timeout=timeout)


def answer(server: LiveServer, body: dict[str, Any], *, key: str | None = None) -> dict[str, Any]:
    r = post_chat(server, body, key=key)
    assert r.status_code == 200, r.text
    return r.json()


def generate(server: LiveServer, fields: list[tuple[str, str]], images: list[bytes], *,
             key: str | None = None) -> httpx.Response:
    files = [("image", (f"img{i}.png", data, "image/png")) for i, data in enumerate(images)]
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(server.url + "/v1/generate", data=form(fields), files=files or None, headers=headers,
                      timeout=30)


def form(fields: list[tuple[str, str]]) -> dict[str, list[str]]:
    """Form fields for httpx, repeated names kept in order."""
    out: dict[str, list[str]] = {}
    for name, value in fields:
        out.setdefault(name, []).append(value)
    return out


@dataclass
class StreamResult:
    status: int
    headers: dict[str, str]
    events: list[tuple[float, str]] = field(default_factory=list)  # (monotonic arrival, data payload)

    @property
    def payloads(self) -> list[str]:
        return [p for _, p in self.events]


def stream_chat(url: str, body: dict[str, Any], started: threading.Event | None = None) -> StreamResult:
    """POST a streaming chat completion and read it to the end, timing each event; `started` is set on headers."""
    with httpx.Client(timeout=60) as client, client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        result = StreamResult(r.status_code, dict(r.headers))
        if started is not None:
            started.set()
        if r.status_code != 200:
            r.read()
            result.events.append((time.monotonic(), r.text))
            return result
        for line in r.iter_lines():
            if line.startswith("data: "):
                result.events.append((time.monotonic(), line[len("data: "):]))
    return result


# ------------------------------------------------------------------------------------------------------ servers
@pytest.fixture(scope="module")
def checkpoint(checkpoint_factory: Callable[[str], Path]) -> Path:
    return checkpoint_factory("clip-llama")


@pytest.fixture(scope="module")
def client(live_server: LiveServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=live_server.url + "/v1", api_key="unused", max_retries=0, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def oracle(checkpoint: Path) -> Callable[[list[dict[str, Any]], int], list[int]]:
    """transformers' LlavaProcessor on the same checkpoint: the prompt ids a chat must become."""
    from transformers import LlavaProcessor

    processor = LlavaProcessor.from_pretrained(checkpoint)

    def ids(messages: list[dict[str, Any]], n_images: int) -> list[int]:
        hf = [{"role": m["role"], "content": m["content"] if isinstance(m["content"], str) else
               [{"type": "image"} if p["type"] == "image_url" else p for p in m["content"]]} for m in messages]
        text = processor.apply_chat_template(hf, add_generation_prompt=True, tokenize=False)
        out = processor(text=text, images=[Image.open(io.BytesIO(RED))] * n_images or None)
        return list(out["input_ids"][0])

    return ids


@pytest.fixture(scope="module")
def guarded(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """API keys, small body/image/pixel caps, one image per request, remote images on with an allow list."""
    hosts = "localhost,127.0.0.1,169.254.169.254,10.0.0.1,::ffff:127.0.0.1"
    server = start_server(checkpoint, tmp_path_factory.mktemp("guarded"), "--served-model-name", MODEL,
                          "--api-keys", ",".join(API_KEYS), "--max-body-bytes", "20000", "--max-image-bytes", "3000",
                          "--max-image-pixels", "100000", "--max-images-per-request", "1", "--max-running", "2",
                          "--allow-remote-images", "--remote-image-hosts", hosts)
    yield server
    server.stop()


@pytest.fixture(scope="module", params=[0, 1], ids=["max-waiting-0", "max-waiting-1"])
def one_slot(request: pytest.FixtureRequest, checkpoint: Path,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """One KV slot and a queue of 0 or 1: a burst must be refused with 429."""
    server = start_server(checkpoint, tmp_path_factory.mktemp("one-slot"), "--served-model-name", MODEL,
                          "--max-running", "1", "--max-waiting", str(request.param))
    yield server
    server.stop()


# ------------------------------------------------------------------------------------------ health and discovery
def test_health_ready_models(live_server: LiveServer) -> None:
    assert httpx.get(live_server.url + "/health").json() == {"status": "ok"}
    ready = httpx.get(live_server.url + "/ready")
    assert ready.status_code == 200 and ready.json()["model"] == MODEL
    models = httpx.get(live_server.url + "/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == [MODEL]
    assert httpx.get(live_server.url + f"/v1/models/{MODEL}").json()["id"] == MODEL


def test_openai_sdk_lists_the_model(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == [MODEL]


# -------------------------------------------------------------------------------------------------- openai SDK
def test_openai_non_stream_and_stream_agree(client: openai.OpenAI) -> None:
    messages: Any = [user("What color is the circle?", RED)]
    full = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=40)
    assert full.object == "chat.completion" and full.model == MODEL and full.id.startswith("chatcmpl-")
    choice = full.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert full.usage is not None and 1 <= full.usage.completion_tokens <= 40
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens

    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=40,
                                                 stream=True, stream_options={"include_usage": True}))
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [choice.finish_reason]
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    details = {"prompt_tokens_details"}
    assert last.usage.model_dump(exclude=details) == full.usage.model_dump(exclude=details)
    # The same prompt again: its image and text come from the prefix cache (whole 16-token blocks, short of the end).
    assert last.usage.prompt_tokens_details.cached_tokens >= (full.usage.prompt_tokens - 17) // 16 * 16 > 0
    assert all(c.usage is None for c in chunks[:-1])


def test_openai_stream_without_usage_option(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(model=MODEL, messages=[user("hello", RED)], temperature=0,
                                                 max_tokens=5, stream=True))
    assert all(c.usage is None and c.choices for c in chunks)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_usage_counts_visual_tokens_like_transformers(client: openai.OpenAI, oracle: Any, checkpoint: Path) -> None:
    image_token = json.loads((checkpoint / "config.json").read_text())["image_token_index"]
    messages: Any = [user("What color is the circle?", RED)]
    ids = oracle(messages, 1)
    assert ids.count(image_token) == VISUAL_TOKENS
    r = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=8)
    assert r.usage is not None and r.usage.prompt_tokens == len(ids)
    text_only: Any = [{"role": "user", "content": "What color is the circle?"}]
    r = client.chat.completions.create(model=MODEL, messages=text_only, temperature=0, max_tokens=1)
    assert r.usage is not None and r.usage.prompt_tokens == len(oracle(text_only, 0))


def test_max_tokens_gives_length_and_exact_completion_tokens(client: openai.OpenAI) -> None:
    messages: Any = [user(LONG_PROMPT, RED)]
    texts = []
    for k in (1, 3, 6):
        r = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=k)
        assert r.choices[0].finish_reason == "length"
        assert r.usage is not None and r.usage.completion_tokens == k
        texts.append(r.choices[0].message.content or "")
    assert texts[2].startswith(texts[1]) and texts[1].startswith(texts[0])  # greedy: a longer budget extends


def test_max_completion_tokens(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=[user(LONG_PROMPT, RED)], temperature=0,
                                       max_completion_tokens=4)
    assert r.choices[0].finish_reason == "length" and r.usage is not None and r.usage.completion_tokens == 4


def test_stop_sequence_cuts_the_answer(client: openai.OpenAI) -> None:
    messages: Any = [user(LONG_PROMPT, RED)]
    full = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=60)
    text = full.choices[0].message.content or ""
    assert len(text) >= 12, text
    stop = text[8:11]
    cut = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=60, stop=stop)
    assert cut.choices[0].message.content == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    assert cut.usage is not None and full.usage is not None
    assert cut.usage.completion_tokens < full.usage.completion_tokens
    streamed = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=60,
                                              stop=[stop, "\x00never"], stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == text[: text.index(stop)]


def test_seed_makes_sampling_reproducible(client: openai.OpenAI) -> None:
    def sample(seed: int) -> str:
        r = client.chat.completions.create(model=MODEL, messages=[user("describe the image", RED)], temperature=1,
                                           seed=seed, max_tokens=24)
        return r.choices[0].message.content or ""

    first = sample(1234)
    assert sample(1234) == first
    assert sample(4321) != first


def test_n_choices_are_seeded_apart_counted_and_share_the_prompt(client: openai.OpenAI,
                                                                 live_server: LiveServer) -> None:
    """n choices: choice i is what a single request with seed + i gives; usage counts the prompt once and every
    choice's tokens; the later choices reuse the first one's prompt blocks; streamed choices come under their
    index."""
    image = png((10, 77, 140))  # a fresh image: nothing of this prompt is cached yet
    kw: Any = {"model": MODEL, "messages": [user("hi", image)], "max_tokens": 6, "temperature": 1,
               "extra_body": {"ignore_eos": True}}
    hits = metric(metrics(live_server), "vlmserve:prefix_cache_hits_total")
    r = client.chat.completions.create(n=3, seed=11, **kw)
    assert [c.index for c in r.choices] == [0, 1, 2] and r.usage is not None
    assert r.usage.completion_tokens == 18 and r.usage.total_tokens == r.usage.prompt_tokens + 18
    shared = metric(metrics(live_server), "vlmserve:prefix_cache_hits_total") - hits
    full_blocks = (r.usage.prompt_tokens - 1) // 16
    assert full_blocks >= 1 and shared >= 2 * full_blocks * 16  # choices 1 and 2 found the prompt's full blocks
    texts = [c.message.content for c in r.choices]
    alone = [client.chat.completions.create(seed=11 + i, **kw).choices[0].message.content for i in range(3)]
    assert texts == alone and len(set(texts)) > 1
    streamed: dict[int, str] = {}
    for chunk in client.chat.completions.create(n=3, seed=11, stream=True, **kw):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + (c.delta.content or "")
    assert [streamed[i] for i in range(3)] == texts
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=[user("hi", RED)], n=9, max_tokens=2)
    body: Any = info.value.body
    assert (body["param"], body["code"]) == ("n", "invalid_value")


@pytest.mark.parametrize(("fields", "param", "code"), [
    ({"top_logprobs": 3}, "top_logprobs", "invalid_value"),  # without logprobs
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "invalid_value"),
    ({"logit_bias": {"99999999": -100}}, "logit_bias", "invalid_value"),  # outside the vocabulary
    ({"prediction": {"type": "content", "content": "x"}}, "prediction", "unsupported_parameter"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools",
     "unsupported_parameter"),
    ({"store": True}, "store", "unsupported_value"),
    ({"min_p": 0.1}, "min_p", "unknown_parameter"),  # vLLM's extra, not ours: refused, not ignored
    ({"stream_options": {"include_usage": True}}, "stream_options", "invalid_value"),  # without stream
])
def test_fields_we_do_not_honour_are_refused_by_name(client: openai.OpenAI, fields: dict[str, Any], param: str,
                                                      code: str) -> None:
    """Never accept a field and ignore it: the `openai` SDK gets a 400 naming the field and why."""
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=[user("hi", RED)], max_tokens=2, extra_body=fields)
    body: Any = info.value.body
    assert (body["param"], body["code"]) == (param, code), body


def test_neutral_values_annotations_and_echoed_answers_are_accepted(client: openai.OpenAI) -> None:
    """Clients that fill every field with its neutral value, annotate requests, or send an answer back as history
    as they got it, are served."""
    first = client.chat.completions.create(
        model=MODEL, messages=[user("hi", RED)], max_tokens=3, temperature=0, logprobs=False,
        response_format={"type": "text"}, metadata={"team": "a"}, store=False, user="u1",
        extra_body={"safety_identifier": "s1", "prompt_cache_key": "k", "tools": [], "tool_choice": "none"},
    )
    answer = first.choices[0].message
    history = [user("hi", RED), answer.model_dump(), {"role": "user", "content": "and then?"}]
    again = client.chat.completions.create(model=MODEL, messages=history, max_tokens=3, temperature=0)
    assert again.choices[0].finish_reason in ("stop", "length")


def test_logit_bias_bans_and_forces_tokens(client: openai.OpenAI, checkpoint: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(checkpoint)

    def answer(temperature: float = 0, **kw: Any) -> str:
        r = client.chat.completions.create(model=MODEL, messages=[user("hi", RED)], max_tokens=6,
                                           temperature=temperature, seed=3, extra_body={"ignore_eos": True}, **kw)
        return r.choices[0].message.content or ""

    free = answer()
    a, b = (tok.encode(word, add_special_tokens=False)[0] for word in ("red", "blue"))  # plain tokens
    assert answer(logit_bias={str(a): 100}) == tok.decode([a] * 6)  # +100 wins every step
    assert answer(temperature=1, logit_bias={str(a): 100}) == tok.decode([a] * 6)  # sampling too
    assert answer(logit_bias={str(a): -100, str(b): 100}) == tok.decode([b] * 6)
    banned = {str(t): -100 for t in tok.encode(free, add_special_tokens=False)}
    assert answer(logit_bias=banned) != free


def test_logprobs_match_transformers_and_stream_as_they_answer(client: openai.OpenAI, checkpoint: Path) -> None:
    """The first token's top logprobs are transformers' log-softmax at the prompt's end; streamed logprobs are the
    answer's, chunk by chunk; the tokens' bytes join to the answer's text."""
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    messages = [user("hi", RED)]
    kw: Any = {"model": MODEL, "messages": messages, "max_tokens": 5, "temperature": 0, "logprobs": True,
               "top_logprobs": 4, "extra_body": {"ignore_eos": True}}
    r = client.chat.completions.create(**kw)
    assert r.choices[0].logprobs is not None and r.usage is not None
    content = r.choices[0].logprobs.content or []
    assert len(content) == r.usage.completion_tokens == 5
    for t in content:  # greedy: the chosen token is the likeliest
        assert len(t.top_logprobs) == 4 and t.top_logprobs[0].token == t.token
        assert t.logprob == pytest.approx(t.top_logprobs[0].logprob) and t.logprob <= 0
        assert [x.logprob for x in t.top_logprobs] == sorted((x.logprob for x in t.top_logprobs), reverse=True)
    joined = bytes(b for t in content for b in (t.bytes or []))  # a random model may emit invalid UTF-8
    assert joined.decode(errors="replace") == r.choices[0].message.content

    processor = LlavaProcessor.from_pretrained(checkpoint)
    hf = LlavaForConditionalGeneration.from_pretrained(checkpoint).eval()
    hf_messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]
    text = processor.apply_chat_template(hf_messages, add_generation_prompt=True, tokenize=False)
    with torch.no_grad():
        logits = hf(**processor(text=text, images=[Image.open(io.BytesIO(RED))], return_tensors="pt")).logits
    want = torch.log_softmax(logits[0, -1].float(), dim=-1).topk(4).values.tolist()
    assert [x.logprob for x in content[0].top_logprobs] == pytest.approx(want, abs=1e-3)

    streamed = []
    for chunk in client.chat.completions.create(stream=True, **kw):
        if chunk.choices and chunk.choices[0].logprobs is not None:
            streamed += chunk.choices[0].logprobs.content or []
    assert [(t.token, t.bytes) for t in streamed] == [(t.token, t.bytes) for t in content]
    assert [t.logprob for t in streamed] == pytest.approx([t.logprob for t in content], abs=1e-5)
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
    assert plain.choices[0].logprobs is None  # not asked: none


class _Shape(pydantic.BaseModel):
    color: Literal["red", "green", "blue"]
    filled: bool
    sides: Literal[0, 3, 4]


def test_structured_outputs_parse_with_the_openai_sdk(client: openai.OpenAI) -> None:
    """`chat.completions.parse(response_format=Model)` returns the parsed object, greedy and sampled alike."""
    for temperature, seed in ((0, None), (1, 1), (1, 2), (1.5, 3)):
        r = client.chat.completions.parse(model=MODEL, messages=[user("describe it", RED)], response_format=_Shape,
                                          max_tokens=60, temperature=temperature, seed=seed)
        assert r.choices[0].finish_reason == "stop"
        assert isinstance(r.choices[0].message.parsed, _Shape), r.choices[0].message.content


@settings(max_examples=12, deadline=None, derandomize=True)
@given(schema=st.fixed_dictionaries({
    "type": st.just("object"),
    "properties": st.dictionaries(
        st.text("abcdefgh", min_size=1, max_size=5),
        st.one_of(st.just({"type": "boolean"}), st.just({"type": "null"}),
                  st.lists(st.text("xyz ", min_size=1, max_size=4), min_size=1, max_size=4, unique=True).map(
                      lambda e: {"enum": e}),
                  st.integers(0, 50).map(lambda m: {"type": "integer", "minimum": m, "maximum": m + 9}),
                  st.integers(1, 6).map(lambda n: {"type": "string", "maxLength": n, "pattern": "^[a-c]*$"})),
        min_size=1, max_size=4),
}).map(lambda s: {**s, "required": sorted(s["properties"]), "additionalProperties": False}))
def test_every_structured_output_validates_against_its_schema(live_server: LiveServer, schema: dict) -> None:
    import jsonschema

    body = chat_body("answer", max_tokens=80, temperature=1, seed=7,
                     response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema}})
    r = post_chat(live_server, body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    if choice["finish_reason"] == "stop":
        jsonschema.validate(json.loads(choice["message"]["content"]), schema)


def test_structured_outputs_choice_regex_and_json_object(client: openai.OpenAI) -> None:
    def content(**extra: Any) -> tuple[str, str]:
        r = client.chat.completions.create(model=MODEL, messages=[user("answer", RED)], max_tokens=40,
                                           temperature=1, seed=5, extra_body=extra)
        return r.choices[0].message.content or "", r.choices[0].finish_reason

    for seed in range(3):
        text, reason = content(structured_outputs={"choice": ["yes", "no", "a \"quoted\" maybe"]}, seed=seed)
        assert text in ("yes", "no", 'a "quoted" maybe') and reason == "stop"
    text, reason = content(structured_outputs={"regex": "[0-9]{3}-[a-c]{2}"})
    assert re.fullmatch("[0-9]{3}-[a-c]{2}", text) and reason == "stop"
    text, reason = content(structured_outputs={"json": {"type": "object", "properties": {"n": {"enum": [1, 2]}},
                                                        "required": ["n"], "additionalProperties": False}})
    assert json.loads(text) in ({"n": 1}, {"n": 2})
    r = client.chat.completions.create(model=MODEL, messages=[user("answer", RED)], max_tokens=200, temperature=0,
                                       response_format={"type": "json_object"})
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content or ""), dict)
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=MODEL, messages=[user("answer", RED)], max_tokens=40, temperature=1, seed=5, stream=True,
        extra_body={"structured_outputs": {"regex": "[0-9]{3}-[a-c]{2}"}}) if c.choices)
    assert re.fullmatch("[0-9]{3}-[a-c]{2}", streamed)


def _nested(depth: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


@pytest.mark.parametrize(("fields", "param"), [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/nope"}}}},
     "response_format"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"structured_outputs": {"regex": "(", "choice": ["a"]}}, "structured_outputs"),
    ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs.regex"),
    ({"structured_outputs": {"grammar": "start: undefined_rule"}}, "structured_outputs.grammar"),
    ({"structured_outputs": {"json": _nested(300)}}, "structured_outputs"),  # a schema bomb (deep nesting)
])
def test_unusable_output_constraints_are_fast_400s(live_server: LiveServer, fields: dict[str, Any],
                                                   param: str) -> None:
    t0 = time.perf_counter()
    error = error_of(post_chat(live_server, chat_body("hi", max_tokens=4, **fields)), 400)
    assert (error["param"] or "").startswith(param), error
    assert time.perf_counter() - t0 < 5  # the compile limit is 2 s; slack for a loaded CI machine
    assert httpx.get(live_server.url + "/health", timeout=5).status_code == 200


def test_a_huge_enum_is_honoured_or_refused_fast(live_server: LiveServer) -> None:
    values = [f"value-{i:05d}" for i in range(20_000)]
    t0 = time.perf_counter()
    r = post_chat(live_server, chat_body("hi", max_tokens=12, temperature=1, seed=1,
                                         structured_outputs={"json": {"enum": values}}))
    assert time.perf_counter() - t0 < 10
    if r.status_code == 200:
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "length" or json.loads(choice["message"]["content"]) in values
    else:
        assert error_of(r, 400)["param"].startswith("structured_outputs")
    assert httpx.get(live_server.url + "/health", timeout=5).status_code == 200


def test_generate_refuses_unknown_form_fields(live_server: LiveServer) -> None:
    r = generate(live_server, [("prompt", "hi"), ("max_tokens", "2"), ("temprature", "0")], [RED])
    error = error_of(r, 400)
    assert (error["param"], error["code"]) == ("temprature", "unknown_parameter") and "temperature" in error["message"]


def test_usage_reports_the_image_tokens(live_server: LiveServer) -> None:
    two = answer(live_server, chat_body("compare", RED, GREEN, max_tokens=2))
    assert two["usage"]["prompt_tokens_details"]["image_tokens"] == 2 * VISUAL_TOKENS
    none = answer(live_server, {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert none["usage"]["prompt_tokens_details"]["image_tokens"] == 0


def test_several_images_and_turns_count(client: openai.OpenAI, oracle: Any) -> None:
    def prompt_tokens(messages: Any) -> int:
        r = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=2)
        assert r.usage is not None
        return r.usage.prompt_tokens

    one = [user("compare", RED)]
    two = [user("compare", RED, GREEN)]
    three = [user("compare", RED, GREEN, BLUE)]
    counts = [prompt_tokens(m) for m in (one, two, three)]
    step = counts[1] - counts[0]
    assert counts[2] - counts[1] == step >= VISUAL_TOKENS  # each image adds its 16 visual tokens (+ the template's)
    for messages, n, count in zip((one, two, three), (1, 2, 3), counts, strict=True):
        assert count == len(oracle(messages, n))

    turns = [user("what is this", RED), {"role": "assistant", "content": "a red thing"}, user("and this", GREEN)]
    last_turn_only = [user("and this", GREEN)]
    assert prompt_tokens(turns) == len(oracle(turns, 2))
    assert prompt_tokens(turns) >= prompt_tokens(last_turn_only) + VISUAL_TOKENS  # the earlier image counts


def test_system_message(client: openai.OpenAI, oracle: Any) -> None:
    plain: Any = [user("What color is the circle?", RED)]
    with_system: Any = [{"role": "system", "content": "You answer with one word."}, *plain]
    r = client.chat.completions.create(model=MODEL, messages=with_system, temperature=0, max_tokens=4)
    assert r.usage is not None and r.usage.prompt_tokens == len(oracle(with_system, 1))
    assert r.usage.prompt_tokens > len(oracle(plain, 1))


def test_openai_sdk_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=[user("hi", RED)], max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[user("hi", RED)], max_tokens=CONTEXT * 2)


# ---------------------------------------------------------------------------------------- native multipart API
def test_sse_events_stay_one_line_for_splitlines_readers() -> None:
    """Generated text may hold U+2028, U+2029 or U+0085: JSON leaves them raw, `str.splitlines` breaks at them."""
    content = "a\u2028b\u2029c\x85d\x0be\x1cf\n\"g\"é🙂"
    event = sse({"choices": [{"delta": {"content": content}}]})
    assert event.endswith("\n\n") and len(event.splitlines()) == 2  # the data line and the blank line
    assert json.loads(event.removeprefix("data: "))["choices"][0]["delta"]["content"] == content
    assert "é🙂" in event  # the rest stays raw UTF-8


def test_generate_json_answer_shape(live_server: LiveServer) -> None:
    r = generate(live_server, [("prompt", "What color is the circle?"), ("temperature", "0"), ("max_tokens", "30")],
                 [RED])
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"id", "model", "text", "finish_reason", "usage"}
    assert set(body["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens"}
    assert body["model"] == MODEL and body["finish_reason"] in ("stop", "length")
    u = body["usage"]
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"] and 1 <= u["completion_tokens"] <= 30
    assert r.headers["x-request-id"] == body["id"]
    # the prompt is one user turn after the images: the same answer as the chat API gives
    chat = answer(live_server, chat_body("What color is the circle?", RED, max_tokens=30))
    assert chat["choices"][0]["message"]["content"] == body["text"]
    details = chat["usage"].pop("prompt_tokens_details")
    assert chat["usage"] == body["usage"]
    assert details["cached_tokens"] > 0  # the same prompt and image as the multipart request: a prefix-cache hit


def test_generate_sse_matches_json(live_server: LiveServer) -> None:
    fields = [("prompt", LONG_PROMPT), ("temperature", "0"), ("max_tokens", "25"), ("model", MODEL)]
    full = generate(live_server, fields, [RED]).json()
    with httpx.stream("POST", live_server.url + "/v1/generate", data=form([*fields, ("stream", "true")]),
                      files=[("image", ("a.png", RED, "image/png"))], timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        payloads = sse_data(r.iter_lines())
    assert payloads[-1] == "[DONE]"
    events = [json.loads(p) for p in payloads[:-1]]
    deltas, final = events[:-1], events[-1]
    assert deltas and all(set(e) == {"id", "text"} for e in deltas)
    assert set(final) == {"id", "finish_reason", "usage"}
    assert len({e["id"] for e in events}) == 1 and final["id"].startswith("gen-")
    assert "".join(e["text"] for e in deltas) == full["text"]
    assert final["finish_reason"] == full["finish_reason"] and final["usage"] == full["usage"]


def test_generate_repeatable_image_and_stop(live_server: LiveServer) -> None:
    base = [("prompt", LONG_PROMPT), ("temperature", "0"), ("max_tokens", "40")]
    one = generate(live_server, base, [RED]).json()
    two = generate(live_server, base, [RED, GREEN]).json()
    assert two["usage"]["prompt_tokens"] - one["usage"]["prompt_tokens"] >= VISUAL_TOKENS
    swapped = generate(live_server, base, [GREEN, RED]).json()
    assert swapped["usage"]["prompt_tokens"] == two["usage"]["prompt_tokens"]
    text = one["text"]
    assert len(text) >= 12, text
    early, late = text[4:6], text[9:12]
    if early in late:
        early = text[4:7]
    cut = generate(live_server, [*base, ("stop", late), ("stop", early)], [RED]).json()
    first = min(text.index(early), text.index(late))
    assert cut["text"] == text[:first] and cut["finish_reason"] == "stop"


@pytest.mark.parametrize(("name", "value"), [("max_tokens", "abc"), ("max_tokens", "0"), ("temperature", "5"),
                                             ("temperature", "nan"), ("top_p", "x"), ("seed", "1.5"),
                                             ("stream", "maybe"), ("top_k", "-1"), ("stop", "")])
def test_generate_bad_fields(live_server: LiveServer, name: str, value: str) -> None:
    r = generate(live_server, [("prompt", "hi"), (name, value)], [RED])
    error = error_of(r, 400)
    assert error["param"] == name and error["type"] == "invalid_request_error"


def test_generate_form_problems(live_server: LiveServer) -> None:
    assert error_of(generate(live_server, [("max_tokens", "3")], [RED]), 400)["param"] == "prompt"
    twice = error_of(generate(live_server, [("prompt", "a"), ("prompt", "b")], [RED]), 400)
    assert twice["param"] == "prompt"
    r = httpx.post(live_server.url + "/v1/generate", json={"prompt": "hi"}, timeout=10)
    assert error_of(r, 400)["code"] == "invalid_content_type"
    not_a_file = httpx.post(live_server.url + "/v1/generate", data={"prompt": "hi", "image": "text"}, timeout=10)
    assert error_of(not_a_file, 400)["param"] == "image"
    garbage = generate(live_server, [("prompt", "hi")], [b"definitely not an image"])
    assert error_of(garbage, 400)["param"] == "image.0"
    wrong_model = generate(live_server, [("prompt", "hi"), ("model", "other")], [RED])
    assert error_of(wrong_model, 404)["code"] == "model_not_found"
    text_only = generate(live_server, [("prompt", "hi"), ("max_tokens", "2"), ("temperature", "0")], [])
    assert text_only.status_code == 200 and text_only.json()["usage"]["completion_tokens"] <= 2


# ------------------------------------------------------------------------------------------------- 400 errors
def test_invalid_json_is_400(live_server: LiveServer) -> None:
    error = error_of(post_chat(live_server, b'{"messages": [oops'), 400)
    assert error["type"] == "invalid_request_error" and "JSON" in error["message"]
    error_of(post_chat(live_server, b"[1, 2]"), 400)
    error_of(post_chat(live_server, b""), 400)


@pytest.mark.parametrize(("body", "param"), [
    ({"model": MODEL}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 5}, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": "many"}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_p": 0}, "top_p"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": [""]}, "stop"),
    ({"messages": [{"role": "user", "content": "hi"}], "stream": "maybe"}, "stream"),
    ({"messages": [{"role": "user", "content": [{"type": "video", "video": "x"}]}]}, "messages.0.content"),
])
def test_schema_errors_are_400_with_param(live_server: LiveServer, body: dict[str, Any], param: str) -> None:
    error = error_of(post_chat(live_server, body), 400)
    assert error["param"] is not None and error["param"].startswith(param), error
    assert "{" not in error["message"][:1]  # a sentence, not a pydantic dump


@pytest.mark.parametrize(("url", "code"), [
    (data_url(b"this is not an image"), "invalid_image"),
    ("data:image/png;base64,!!!not-base64!!!", "invalid_image"),
    ("data:image/png;base64,", "invalid_image"),
    ("data:text/plain;base64,aGVsbG8=", "unsupported_image"),
    ("data:image/png,rawbytes", "invalid_image_url"),
    ("file:///etc/passwd", "invalid_image_url"),
    ("ftp://127.0.0.1/x.png", "invalid_image_url"),
    ("/etc/passwd", "invalid_image_url"),
])
def test_bad_image_urls_are_400(live_server: LiveServer, url: str, code: str) -> None:
    error = error_of(post_chat(live_server, chat_body("hi", url, max_tokens=2)), 400)
    assert error["code"] == code, error
    assert error["param"] == "messages.0.content.0.image_url.url"


def test_truncated_image_is_400(live_server: LiveServer) -> None:
    error = error_of(post_chat(live_server, chat_body("hi", RED[: len(RED) // 2], max_tokens=2)), 400)
    assert error["param"] == "messages.0.content.0.image_url.url"


def test_image_outside_user_turns_is_400(live_server: LiveServer) -> None:
    body = {"model": MODEL, "messages": [{"role": "assistant", "content": [image_part(RED)]}, user("hi", RED)]}
    assert error_of(post_chat(live_server, body), 400)["param"] == "messages.0.content.0"


def test_context_overflow_names_the_numbers(live_server: LiveServer) -> None:
    prompt = answer(live_server, chat_body("hi", RED, max_tokens=1))["usage"]["prompt_tokens"]
    error = error_of(post_chat(live_server, chat_body("hi", RED, max_tokens=1000)), 400)
    assert error["code"] == "context_length_exceeded" and error["param"] == "max_tokens"
    for number in (prompt, 1000, CONTEXT, prompt + 1000):
        assert str(number) in error["message"], error["message"]
    fits = answer(live_server, chat_body("hi", RED, max_tokens=CONTEXT - prompt))
    assert fits["usage"]["prompt_tokens"] == prompt
    error_of(post_chat(live_server, chat_body("hi", RED, max_tokens=CONTEXT - prompt + 1)), 400)


def test_too_many_images_is_400(guarded: LiveServer) -> None:
    error = error_of(post_chat(guarded, chat_body("hi", RED, GREEN, max_tokens=2), key="k1"), 400)
    assert error["code"] == "too_many_images"
    error = error_of(generate(guarded, [("prompt", "hi")], [RED, GREEN], key="k1"), 400)
    assert error["code"] == "too_many_images" and error["param"] == "image"
    assert generate(guarded, [("prompt", "hi"), ("max_tokens", "2")], [RED], key="k1").status_code == 200


def test_too_many_pixels_is_400(guarded: LiveServer) -> None:
    big = png(size=(400, 400))  # 160000 pixels over a 100000 cap, a few hundred bytes
    assert len(big) < 3000
    error = error_of(post_chat(guarded, chat_body("hi", big, max_tokens=2), key="k1"), 400)
    assert error["code"] == "image_too_many_pixels"
    error = error_of(generate(guarded, [("prompt", "hi")], [big], key="k1"), 400)
    assert error["code"] == "image_too_many_pixels"


# ------------------------------------------------------------------------------------------------- 401 errors
def test_api_keys(guarded: LiveServer) -> None:
    body = chat_body("hi", RED, max_tokens=2)
    missing = post_chat(guarded, body)
    error = error_of(missing, 401)
    assert error["type"] == "authentication_error" and missing.headers["www-authenticate"] == "Bearer"
    error_of(post_chat(guarded, body, key="wrong"), 401)
    error_of(post_chat(guarded, body, key="k1x"), 401)
    error_of(post_chat(guarded, body, headers={"Authorization": "Basic azE6"}), 401)
    error_of(generate(guarded, [("prompt", "hi")], [RED]), 401)
    error_of(httpx.get(guarded.url + "/v1/models"), 401)
    for key in API_KEYS:
        assert answer(guarded, body, key=key)["usage"]["completion_tokens"] <= 2
    assert httpx.get(guarded.url + "/health").status_code == 200
    assert httpx.get(guarded.url + "/ready").status_code == 200
    assert httpx.get(guarded.url + "/metrics").status_code == 200
    with openai.OpenAI(base_url=guarded.url + "/v1", api_key="k2", max_retries=0) as sdk:
        assert [m.id for m in sdk.models.list()] == [MODEL]
    with openai.OpenAI(base_url=guarded.url + "/v1", api_key="nope", max_retries=0) as sdk, \
            pytest.raises(openai.AuthenticationError):
        sdk.models.list()
    # Ollama's routes: the same keys, errors in Ollama's shape; its client passes the key as a header
    refused = httpx.get(guarded.url + "/api/tags")
    assert refused.status_code == 401 and set(refused.json()) == {"error"}
    import ollama

    tagged = ollama.Client(host=guarded.url, headers={"Authorization": "Bearer k1"}).list()
    assert [m.model for m in tagged.models] == [f"{MODEL}:latest"]
    assert httpx.get(guarded.url + "/api/version").status_code == 401  # as every route but health, ready, metrics


# ------------------------------------------------------------------------------------------------- 404 errors
def test_unknown_model_is_404(live_server: LiveServer) -> None:
    error = error_of(post_chat(live_server, {**chat_body("hi", RED), "model": "gpt-4o"}), 404)
    assert error["param"] == "model" and error["code"] == "model_not_found" and error["type"] == "not_found_error"
    error_of(httpx.get(live_server.url + "/v1/models/gpt-4o"), 404)


def test_unknown_route_is_404(live_server: LiveServer) -> None:
    error = error_of(httpx.get(live_server.url + "/v2/nothing"), 404)
    assert "/v2/nothing" in error["message"]
    error_of(httpx.post(live_server.url + "/v1/embeddings", json={}), 404)
    error_of(httpx.get(live_server.url + "/v1/chat/completions"), 405)


# ------------------------------------------------------------------------------------------------- 413 errors
def test_body_over_the_cap_is_413(guarded: LiveServer) -> None:
    body = chat_body("x" * 30_000, RED, max_tokens=2)
    error = error_of(post_chat(guarded, body, key="k1"), 413)
    assert error["code"] == "request_too_large" and "20000" in error["message"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: the cap holds on the bytes actually read
        payload = json.dumps(body).encode()
        for i in range(0, len(payload), 4096):
            yield payload[i : i + 4096]

    chunked = httpx.post(guarded.url + "/v1/chat/completions", content=chunks(), timeout=30,
                         headers={"Authorization": "Bearer k1", "Content-Type": "application/json"})
    assert error_of(chunked, 413)["code"] == "request_too_large"
    files = [("image", ("big.bin", b"\0" * 25_000, "application/octet-stream"))]
    upload = httpx.post(guarded.url + "/v1/generate", data={"prompt": "hi"}, files=files, timeout=30,
                        headers={"Authorization": "Bearer k1"})
    error_of(upload, 413)
    assert answer(guarded, chat_body("hi", RED, max_tokens=2), key="k1")  # the server is fine afterwards


def test_image_over_the_cap_is_413(guarded: LiveServer) -> None:
    big = noise_png(48)
    assert 3000 < len(big) < 12_000
    error = error_of(post_chat(guarded, chat_body("hi", big, max_tokens=2), key="k1"), 413)
    assert error["code"] == "image_too_large" and error["param"] == "messages.0.content.0.image_url.url"
    error = error_of(generate(guarded, [("prompt", "hi")], [big], key="k1"), 413)
    assert error["code"] == "image_too_large"


# --------------------------------------------------------------------------------------------- 429 queue full
def test_queue_full_is_429_with_retry_after(one_slot: LiveServer) -> None:
    alone = answer(one_slot, chat_body(LONG_PROMPT, RED, max_tokens=4))  # a lone request always gets through
    assert alone["usage"]["completion_tokens"] == 4
    prompt = alone["usage"]["prompt_tokens"]
    body = chat_body(LONG_PROMPT, RED, max_tokens=CONTEXT - prompt, stream=True)
    with ThreadPoolExecutor(10) as pool:
        results = list(pool.map(lambda _: stream_chat(one_slot.url, body), range(10)))
    refused = [r for r in results if r.status == 429]
    served = [r for r in results if r.status == 200]
    assert refused and served, [r.status for r in results]
    assert len(refused) + len(served) == len(results)
    for r in refused:
        assert int(r.headers["retry-after"]) >= 1
        error = json.loads(r.payloads[0])["error"]
        assert set(error) == ERROR_KEYS and error["type"] == "rate_limit_error" and error["code"] == "queue_full"
    for r in served:
        assert r.payloads[-1] == "[DONE]"
    assert httpx.get(one_slot.url + "/ready").status_code == 200


# ---------------------------------------------------------------------------------------------- remote images
def test_remote_images_are_off_by_default(live_server: LiveServer) -> None:
    error = error_of(post_chat(live_server, chat_body("hi", "http://127.0.0.1:9/x.png", max_tokens=2)), 400)
    assert error["code"] == "remote_images_disabled"
    error = error_of(post_chat(live_server, chat_body("hi", "https://example.com/x.png", max_tokens=2)), 400)
    assert error["code"] == "remote_images_disabled"


class _Recorder(http.server.BaseHTTPRequestHandler):
    hits: list[str] = []  # noqa: RUF012 (shared by the handler instances of one test)

    def do_GET(self) -> None:
        type(self).hits.append(self.path)
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(RED)))
        self.end_headers()
        self.wfile.write(RED)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def image_host() -> Iterator[tuple[int, list[str]]]:
    """A local HTTP server that would serve an image and records every request it gets."""
    _Recorder.hits = []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd.server_address[1], _Recorder.hits
    httpd.shutdown()
    httpd.server_close()


def test_remote_images_refuse_private_and_unlisted_hosts(guarded: LiveServer,
                                                         image_host: tuple[int, list[str]]) -> None:
    port, hits = image_host
    refused = {
        f"http://localhost:{port}/x.png": "non-public",
        f"http://127.0.0.1:{port}/x.png": "non-public",
        f"http://[::ffff:127.0.0.1]:{port}/x.png": "non-public",
        "http://169.254.169.254/latest/meta-data": "non-public",
        "http://10.0.0.1/": "non-public",
        f"http://127.0.0.2:{port}/x.png": "allow list",
        "http://images.example.com/x.png": "allow list",
        "https://metadata.google.internal/computeMetadata/v1/": "allow list",
        f"http://LOCALHOST.:{port}/x.png": "allow list",
        f"ftp://localhost:{port}/x.png": "not supported",
    }
    for url, why in refused.items():
        error = error_of(post_chat(guarded, chat_body("hi", url, max_tokens=2), key="k1"), 400)
        assert why in error["message"], (url, error)
        assert error["param"] == "messages.0.content.0.image_url.url"
    assert hits == []  # nothing was fetched
    # the same host serves fine to a client: the refusal is the server's address check, not a dead port
    assert httpx.get(f"http://127.0.0.1:{port}/x.png").content == RED


@pytest.mark.parametrize(("address", "public"), [
    ("127.0.0.1", False), ("127.8.9.10", False), ("::1", False), ("0.0.0.0", False), ("::", False),
    ("10.0.0.1", False), ("172.16.5.4", False), ("192.168.1.1", False), ("fc00::1", False), ("fd12:3456::1", False),
    ("169.254.169.254", False), ("fe80::1", False), ("100.64.0.1", False), ("100.100.100.200", False),
    ("fd00:ec2::254", False), ("224.0.0.1", False), ("255.255.255.255", False), ("240.0.0.1", False),
    ("::ffff:127.0.0.1", False), ("::ffff:169.254.169.254", False), ("::ffff:10.0.0.1", False),
    ("::ffff:192.168.0.1", False), ("8.8.8.8", True), ("93.184.216.34", True), ("2001:4860:4860::8888", True),
    ("::ffff:8.8.8.8", True),
])
def test_is_public_address(address: str, public: bool) -> None:
    assert is_public_address(address) is public


def test_fetch_checks_every_redirect(monkeypatch: pytest.MonkeyPatch) -> None:
    """Redirects are re-checked; connections go to the checked address; the byte cap holds (no real network)."""
    addresses = {"img.example": "93.184.216.34", "cdn.example": "93.184.216.35", "meta.example": "169.254.169.254"}

    def fake_getaddrinfo(host: str, port: int, *args: Any, **kwargs: Any) -> list[Any]:
        if host not in addresses:
            raise socket.gaierror(f"unknown host {host}")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (addresses[host], port))]

    monkeypatch.setattr(remote_images.socket, "getaddrinfo", fake_getaddrinfo)
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        routes = {"/meta": httpx.Response(302, headers={"Location": "http://meta.example/latest"}),
                  "/unlisted": httpx.Response(302, headers={"Location": "http://evil.example/x.png"}),
                  "/file": httpx.Response(302, headers={"Location": "file:///etc/passwd"}),
                  "/loop": httpx.Response(302, headers={"Location": "/loop"}),
                  "/hop": httpx.Response(302, headers={"Location": "http://cdn.example/ok"}),
                  "/big": httpx.Response(200, content=b"x" * 5000),
                  "/missing": httpx.Response(404)}
        return routes.get(request.url.path, httpx.Response(200, content=RED))

    def fetch(url: str, hosts: tuple[str, ...] = ("img.example", "cdn.example", "meta.example")) -> bytes:
        async def go() -> bytes:
            async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as c:
                return await fetch_image(url, allowed_hosts=list(hosts), max_bytes=4000, timeout=5, client=c)

        return asyncio.run(go())

    assert fetch("http://img.example/ok") == RED
    assert seen[-1].url.host == "93.184.216.34" and seen[-1].headers["host"] == "img.example"
    assert fetch("http://img.example/hop") == RED and seen[-1].url.host == "93.184.216.35"
    cases = {"http://img.example/meta": "non-public", "http://img.example/unlisted": "allow list",
             "http://img.example/file": "scheme", "http://img.example/loop": "redirected more than",
             "http://img.example/missing": "404", "http://meta.example/x": "non-public",
             "http://nowhere.example/x": "allow list"}
    for url, why in cases.items():
        with pytest.raises(RemoteImageError, match=why):
            fetch(url)
    with pytest.raises(RemoteImageError, match="cannot resolve"):
        fetch("http://nowhere.example/x", hosts=("nowhere.example",))
    with pytest.raises(RemoteImageError) as info:
        fetch("http://img.example/big")
    assert info.value.too_large
    assert all(r.url.host in ("93.184.216.34", "93.184.216.35") for r in seen)  # never a private address


# ---------------------------------------------------------------------------------------------- the ask CLI
def ask(url: str, *args: str) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    env.pop("VLMSERVE_API_KEY", None)
    return subprocess.run([sys.executable, "-m", "vlmserve.server.cli", "ask", "--url", url, *args],
                          capture_output=True, timeout=60, env=env, check=False)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_ask_cli_prints_the_answer(live_server: LiveServer, tmp_path: Path, stream: bool) -> None:
    image = tmp_path / "red.png"
    image.write_bytes(RED)
    expected = answer(live_server, chat_body("What color is the circle?", RED, max_tokens=20))
    text = expected["choices"][0]["message"]["content"]
    args = ["--image", str(image), "--temperature", "0", "--max-tokens", "20", "What color is the circle?"]
    done = ask(live_server.url + "/", *args, *(["--stream"] if stream else []))
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode() == text + "\n"


def test_ask_cli_errors(live_server: LiveServer, tmp_path: Path) -> None:
    image = tmp_path / "red.png"
    image.write_bytes(RED)
    dead = ask(f"http://127.0.0.1:{free_port()}", "--image", str(image), "hi")
    assert dead.returncode != 0 and dead.stdout == b"" and b"cannot reach" in dead.stderr
    for extra in ([], ["--stream"]):
        wrong = ask(live_server.url, "--image", str(image), "--model", "nope", *extra, "hi")
        assert wrong.returncode != 0 and wrong.stdout == b""
        assert b"404" in wrong.stderr and b"nope" in wrong.stderr
    missing = ask(live_server.url, "--image", str(tmp_path / "missing.png"), "hi")
    assert missing.returncode != 0 and b"missing.png" in missing.stderr


# ----------------------------------------------------------------------------------- metrics, logs, disconnect
def test_metrics_exposition(live_server: LiveServer) -> None:
    answer(live_server, chat_body("hi", BLUE, max_tokens=3))
    answer(live_server, chat_body("hi again", BLUE, max_tokens=3))  # the same image: a visual-token cache hit
    text = metrics(live_server)
    for name in ("vlmserve:time_to_first_token_seconds_bucket", "vlmserve:inter_token_latency_seconds_bucket",
                 "vlmserve:e2e_request_latency_seconds_count", "vlmserve:num_requests_running",
                 "vlmserve:num_requests_waiting", "vlmserve:vision_cache_hits_total",
                 "vlmserve:vision_cache_misses_total", "vlmserve:generation_tokens_total",
                 "vlmserve:prompt_tokens_total", "vlmserve:image_preprocess_seconds_count",
                 "vlmserve:vision_encoder_seconds_count", "vlmserve:http_requests_total"):
        metric(text, name)
    assert metric(text, "vlmserve:vision_cache_hits_total") >= 1
    assert metric(text, "vlmserve:vision_cache_misses_total") >= 1
    assert metric(text, "vlmserve:e2e_request_latency_seconds_count") >= 2
    assert 'route="/v1/chat/completions",status="200"' in text
    assert "# TYPE vlmserve:time_to_first_token_seconds histogram" in text


def test_request_id_reaches_the_log(live_server: LiveServer) -> None:
    r = post_chat(live_server, chat_body("hi", RED, max_tokens=2))
    rid = r.json()["id"]
    assert r.headers["x-request-id"] == rid
    assert poll(lambda: rid in live_server.log(), timeout=5)
    gen = generate(live_server, [("prompt", "hi"), ("max_tokens", "2")], [RED]).json()["id"]
    assert poll(lambda: gen in live_server.log(), timeout=5)



def _after_one_cancellation(server: LiveServer, cancelled0: float) -> str:
    """Wait until the running gauge is back to 0 after a cancellation; the metrics text, exactly one more cancelled."""

    def settled() -> bool:
        text = metrics(server)
        return (metric(text, "vlmserve:num_requests_running") == 0
                and metric(text, "vlmserve:request_cancelled_total") > cancelled0)

    assert poll(settled, timeout=10)
    after = metrics(server)
    assert metric(after, "vlmserve:request_cancelled_total") == cancelled0 + 1
    return after


def test_client_disconnect_cancels_generation(live_server: LiveServer) -> None:
    prompt = answer(live_server, chat_body(LONG_PROMPT, RED, max_tokens=1))["usage"]["prompt_tokens"]
    budget = CONTEXT - prompt
    assert answer(live_server, chat_body(LONG_PROMPT, RED, max_tokens=budget))["choices"][0]["finish_reason"] == \
        "length"  # left alone, this request runs the whole budget
    before = metrics(live_server)
    cancelled0 = metric(before, "vlmserve:request_cancelled_total")
    finished0 = metric(before, "vlmserve:request_success_total")
    generated0 = metric(before, "vlmserve:generation_tokens_total")
    body = chat_body(LONG_PROMPT, RED, max_tokens=budget, stream=True)
    with httpx.Client(timeout=30) as c, c.stream("POST", live_server.url + "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        first = next(line for line in r.iter_lines() if line.startswith("data: "))
        rid = json.loads(first[len("data: "):])["id"]
    # the connection is closed with the answer unread

    after = _after_one_cancellation(live_server, cancelled0)
    # it never finished: no success recorded and none of its tokens counted as a completed generation
    assert metric(after, "vlmserve:request_success_total") == finished0
    assert metric(after, "vlmserve:generation_tokens_total") == generated0
    assert poll(lambda: f"request {rid} cancelled" in live_server.log(), timeout=5)


def test_non_streamed_disconnect_cancels_too(live_server: LiveServer) -> None:
    prompt = answer(live_server, chat_body(LONG_PROMPT, RED, max_tokens=1))["usage"]["prompt_tokens"]
    before = metrics(live_server)
    cancelled0 = metric(before, "vlmserve:request_cancelled_total")
    generated0 = metric(before, "vlmserve:generation_tokens_total")
    body = json.dumps(chat_body(LONG_PROMPT, RED, max_tokens=CONTEXT - prompt)).encode()
    host, port = live_server.url.removeprefix("http://").split(":")
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head + body)
        # hang up once the server is generating (before that, uvicorn would drop the request unread)
        assert poll(lambda: metric(metrics(live_server), "vlmserve:num_requests_running") >= 1, interval=0.002)

    after = _after_one_cancellation(live_server, cancelled0)
    assert metric(after, "vlmserve:generation_tokens_total") == generated0
    assert httpx.get(live_server.url + "/ready").status_code == 200


# ---------------------------------------------------------------------------------------------- SIGTERM, 503
def test_sigterm_drains_in_flight_streams_and_exits_0(checkpoint: Path, tmp_path: Path) -> None:
    server = start_server(checkpoint, tmp_path, "--served-model-name", MODEL, "--max-running", "1",
                          "--max-waiting", "8")
    try:
        prompt = answer(server, chat_body(LONG_PROMPT, RED, max_tokens=1))["usage"]["prompt_tokens"]
        body = chat_body(LONG_PROMPT, RED, max_tokens=CONTEXT - prompt, stream=True,
                         stream_options={"include_usage": True})
        n = 6  # one slot: they run one after another, so the later ones generate after the signal
        started = [threading.Event() for _ in range(n)]
        with ThreadPoolExecutor(n) as pool:
            futures = [pool.submit(stream_chat, server.url, body, started[i]) for i in range(n)]
            assert all(e.wait(30) for e in started)
            signalled = time.monotonic()
            server.process.send_signal(signal.SIGTERM)

            def refused() -> bool:
                try:
                    r = httpx.get(server.url + "/ready", timeout=2)
                except httpx.TransportError:
                    return True  # the listening socket is already closed
                if r.status_code == 503:
                    assert r.headers["retry-after"] and r.json()["status"] == "draining"
                    return True
                return False

            assert poll(refused, timeout=10)
            try:
                late = post_chat(server, chat_body("hi", RED, max_tokens=2), timeout=5)
            except httpx.TransportError:
                pass
            else:
                error = error_of(late, 503)
                assert late.headers["retry-after"] and error["type"] == "service_unavailable"
            results = [f.result(timeout=60) for f in futures]
        for result in results:
            assert result.status == 200
            assert result.payloads[-1] == "[DONE]"
            chunks = [json.loads(p) for p in result.payloads[:-1]]
            assert "error" not in chunks[-1]
            finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
            assert finishes[-1] in ("stop", "length")
            assert chunks[-1]["usage"]["completion_tokens"] >= 1
        assert max(t for r in results for t, _ in r.events) > signalled  # tokens kept coming after the signal
        assert server.process.wait(30) == 0
        assert "draining" in server.log()
    finally:
        server.stop(signal.SIGKILL)


def test_bench_cli_reports_load_figures(live_server: LiveServer) -> None:
    """`vlmserve bench` drives the server with concurrent streams and prints one JSON line of figures."""
    out = subprocess.run(
        [sys.executable, "-m", "vlmserve.server.cli", "bench", "--url", live_server.url, "--model", "tiny-llava",
         "--requests", "6", "--concurrency", "3", "--max-tokens", "5", "--distinct-images", "3", "--ignore-eos"],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["ok"] == 6 and result["errors"] == {}
    assert result["mean_completion_tokens"] == 5  # ignore_eos: exactly max_tokens each
    assert result["completion_tok_per_s"] > 0 and result["ttft_p50"] > 0
