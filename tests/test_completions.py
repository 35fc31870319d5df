"""`POST /v1/completions` through the `openai` SDK: raw prompts as transformers continues them, echo, n over several
prompts, legacy logprobs, streaming, and the fields it refuses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import openai
import pytest
import torch
from live_server import LiveServer

MODEL = "tiny-llava"


@pytest.fixture(scope="module")
def client(live_server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=live_server.url + "/v1", api_key="x", max_retries=0)


@pytest.fixture(scope="module")
def hf(checkpoint_factory: Any) -> tuple[Any, Any]:
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    path: Path = checkpoint_factory("clip-llama")
    return AutoTokenizer.from_pretrained(path), LlavaForConditionalGeneration.from_pretrained(path).eval()


def test_a_text_prompt_continues_as_transformers_does(client: openai.OpenAI, hf: tuple[Any, Any]) -> None:
    tok, model = hf
    prompt = "the red circle is"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0,
                                  extra_body={"ignore_eos": True})
    ids = tok(prompt, return_tensors="pt").input_ids
    assert r.usage is not None and r.usage.prompt_tokens == ids.shape[1] and r.usage.completion_tokens == 6
    with torch.no_grad():
        out = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, min_new_tokens=6)
    assert r.choices[0].text == tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert r.choices[0].finish_reason == "length" and r.object == "text_completion"
    by_ids = client.completions.create(model=MODEL, prompt=ids[0].tolist(), max_tokens=6, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert by_ids.choices[0].text == r.choices[0].text
    echoed = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0, echo=True,
                                       extra_body={"ignore_eos": True})
    assert echoed.choices[0].text == prompt + r.choices[0].text


def test_several_prompts_times_n_and_streaming(client: openai.OpenAI) -> None:
    kw: Any = {"model": MODEL, "max_tokens": 5, "temperature": 1, "seed": 4, "extra_body": {"ignore_eos": True}}
    r = client.completions.create(prompt=["a blue square", "two shapes"], n=2, **kw)
    assert [c.index for c in r.choices] == [0, 1, 2, 3] and r.usage is not None
    assert r.usage.completion_tokens == 20
    single = client.completions.create(prompt="two shapes", n=2, **kw)
    assert [c.text for c in r.choices[2:]] == [c.text for c in single.choices]  # seeds per choice, not per request
    streamed: dict[int, str] = {}
    for chunk in client.completions.create(prompt=["a blue square", "two shapes"], n=2, stream=True,
                                           stream_options={"include_usage": True}, **kw):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + c.text
        if chunk.usage is not None:
            assert chunk.usage.completion_tokens == 20
    assert [streamed[i] for i in range(4)] == [c.text for c in r.choices]


def test_legacy_logprobs(client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL, prompt="the shape", max_tokens=4, temperature=0, logprobs=2,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert lp is not None and lp.tokens and lp.token_logprobs and lp.top_logprobs and lp.text_offset
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 4
    assert "".join(lp.tokens) == r.choices[0].text
    assert all(v <= 0 for v in lp.token_logprobs) and all(1 <= len(t) <= 2 for t in lp.top_logprobs)
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert top[token] == pytest.approx(value)  # greedy: the chosen token is the likeliest


@pytest.mark.parametrize(("fields", "param", "code"), [
    ({"suffix": "x"}, "suffix", "unsupported_parameter"),
    ({"echo": True, "logprobs": 1}, "echo", "unsupported_value"),
    ({"best_of": 3}, "best_of", "unsupported_value"),
    ({"prompt": [10**9]}, "prompt", "invalid_value"),
    ({"logprobs": 6}, "logprobs", "invalid_value"),
    ({"n": 9}, "n", "invalid_value"),
    ({"min_tokens": 2}, "min_tokens", "unknown_parameter"),
    ({"stream_options": {"include_usage": True}}, "stream_options", "invalid_value"),
])
def test_refused_fields(client: openai.OpenAI, fields: dict[str, Any], param: str, code: str) -> None:
    body: dict[str, Any] = {"model": MODEL, "prompt": "hi", "max_tokens": 2, **fields}
    with pytest.raises(openai.BadRequestError) as info:
        client.post("/completions", body=body, cast_to=dict)
    error: Any = info.value.body
    assert (error["param"], error["code"]) == (param, code), error
