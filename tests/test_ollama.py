"""Ollama's API through the official `ollama` Python client, against the session's live server (`tiny-llava`)."""

from __future__ import annotations

import io
import json
from typing import Any

import httpx
import ollama
import openai
import pytest
from live_server import LiveServer
from PIL import Image

MODEL = "tiny-llava"


def png(color: tuple[int, int, int] = (200, 10, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), color).save(buf, "PNG")
    return buf.getvalue()


RED = png()
GREEDY = {"temperature": 0, "num_predict": 6}


@pytest.fixture(scope="module")
def client(live_server: LiveServer) -> ollama.Client:
    return ollama.Client(host=live_server.url)


def test_chat_with_an_image_answers_as_the_openai_route_does(client: ollama.Client, live_server: LiveServer) -> None:
    r = client.chat(model=MODEL, messages=[{"role": "user", "content": "what color?", "images": [RED]}],
                    options=GREEDY)
    assert r.done and r.done_reason in ("stop", "length") and r.message.role == "assistant"
    assert r.prompt_eval_count and r.eval_count and 1 <= r.eval_count <= 6 and r.total_duration
    oai = openai.OpenAI(base_url=live_server.url + "/v1", api_key="x")
    import base64

    url = "data:image/png;base64," + base64.b64encode(RED).decode()
    same = oai.chat.completions.create(model=MODEL, temperature=0, max_tokens=6, messages=[
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                     {"type": "text", "text": "what color?"}]}])
    assert r.message.content == same.choices[0].message.content
    assert r.prompt_eval_count == same.usage.prompt_tokens  # type: ignore[union-attr]


def test_streamed_chat_joins_to_the_answer(client: ollama.Client) -> None:
    messages: Any = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi", "images": [RED]}]
    whole = client.chat(model=f"{MODEL}:latest", messages=messages, options=GREEDY)
    parts = list(client.chat(model=f"{MODEL}:latest", messages=messages, options=GREEDY, stream=True))
    assert "".join(p.message.content or "" for p in parts) == whole.message.content
    assert parts[-1].done and not any(p.done for p in parts[:-1]) and parts[-1].eval_count == whole.eval_count


def test_generate_plain_streamed_and_with_a_system_prompt(client: ollama.Client) -> None:
    r = client.generate(model=MODEL, prompt="describe", images=[RED], options={**GREEDY, "seed": 3})
    assert r.done and r.response is not None and r.eval_count
    streamed = "".join(p.response or "" for p in client.generate(model=MODEL, prompt="describe", images=[RED],
                                                                  options={**GREEDY, "seed": 3}, stream=True))
    assert streamed == r.response
    with_system = client.generate(model=MODEL, prompt="describe", system="you are terse", options=GREEDY)
    assert with_system.prompt_eval_count and with_system.prompt_eval_count > (
        client.generate(model=MODEL, prompt="describe", options=GREEDY).prompt_eval_count or 0)


def test_options_are_honoured_no_ops_accepted_and_the_rest_refused(client: ollama.Client) -> None:
    base: Any = {"model": MODEL, "prompt": "hi", "images": [RED]}
    one = client.generate(**base, options={"num_predict": 1, "temperature": 0})
    assert one.eval_count == 1 and one.done_reason == "length"
    sampled = [client.generate(**base, options={"num_predict": 8, "temperature": 1, "seed": s}).response
               for s in (1, 1, 2)]
    assert sampled[0] == sampled[1]
    calm = client.generate(**base, keep_alive="5m", options={"num_predict": 2, "num_gpu": 0, "num_thread": 2,
                                                               "num_batch": 8, "use_mmap": True, "num_ctx": 128})
    assert calm.done
    for bad in ({"mirostat": 2}, {"typical_p": 0.5}, {"num_ctx": 10**6}, {"num_predict": 0}, {"flux": 1}):
        with pytest.raises(ollama.ResponseError) as info:
            client.generate(**base, options=bad)
        assert info.value.status_code == 400 and next(iter(bad)) in info.value.error, info.value.error
    url = str(client._client.base_url).rstrip("/")
    refused = [("/api/generate", "think", True), ("/api/generate", "raw", True), ("/api/generate", "suffix", "x"),
               ("/api/chat", "tools", [{"type": "function", "function": {"name": "f"}}])]
    for path, field, value in refused:
        body = {"model": MODEL, "stream": False, field: value,
                **({"messages": [{"role": "user", "content": "hi"}]} if path == "/api/chat" else {"prompt": "hi"})}
        r = httpx.post(url + path, json=body, timeout=30)
        assert r.status_code == 400 and field in r.json()["error"], (field, r.text)


def test_format_json_and_schema(client: ollama.Client) -> None:
    schema = {"type": "object", "properties": {"color": {"enum": ["red", "green"]}}, "required": ["color"],
              "additionalProperties": False}
    r = client.chat(model=MODEL, messages=[{"role": "user", "content": "color?", "images": [RED]}], format=schema,
                    options={"temperature": 1, "seed": 2, "num_predict": 30})
    assert r.done_reason == "stop" and json.loads(r.message.content or "") in ({"color": "red"}, {"color": "green"})
    free = client.generate(model=MODEL, prompt="hi", format="json", options={"temperature": 0, "num_predict": 80})
    if free.done_reason == "stop":
        assert isinstance(json.loads(free.response or ""), dict)


def test_list_show_ps_version(client: ollama.Client) -> None:
    models = client.list().models
    assert [m.model for m in models] == [f"{MODEL}:latest"] and models[0].size and models[0].details
    shown = client.show(MODEL)
    assert shown.capabilities and "vision" in shown.capabilities and shown.template and shown.modelinfo
    running = client.ps().models
    assert [m.model for m in running] == [f"{MODEL}:latest"]
    assert httpx.get(str(client._client.base_url).rstrip("/") + "/api/version", timeout=10).json()["version"]


def test_errors_have_ollamas_shape(client: ollama.Client, live_server: LiveServer) -> None:
    with pytest.raises(ollama.ResponseError) as info:
        client.chat(model="llama3", messages=[{"role": "user", "content": "hi"}])
    assert info.value.status_code == 404 and "llama3" in info.value.error
    url = live_server.url
    for path, body in (("/api/chat", b"{oops"), ("/api/generate", b'{"model": "tiny-llava", "images": ["!!"]}'),
                       ("/api/chat", b'{"model": "tiny-llava", "messages": [{"role": "assistant", "content": "x", '
                                     b'"images": ["AAAA"]}]}'), ("/api/show", b'{"model": "nope"}')):
        r = httpx.post(url + path, content=body, headers={"content-type": "application/json"}, timeout=30)
        assert r.status_code in (400, 404) and set(r.json()) == {"error"}, (path, r.text)
