"""`POST /v1/responses` through the `openai` SDK: text and image input, instructions, the streaming event sequence
`responses.stream()` consumes, structured text formats, and the stateful fields it refuses."""

from __future__ import annotations

import base64
import io
import json
from typing import Any

import openai
import pydantic
import pytest
from live_server import LiveServer
from PIL import Image

MODEL = "tiny-llava"


def png(color: tuple[int, int, int] = (200, 10, 10)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), color).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def client(live_server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=live_server.url + "/v1", api_key="x", max_retries=0)


def _with_image(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "input_image", "image_url": png()},
                                         {"type": "input_text", "text": text}]}]


def test_a_response_answers_as_chat_does(client: openai.OpenAI) -> None:
    r = client.responses.create(model=MODEL, input=_with_image("what color?"), instructions="be brief",
                                max_output_tokens=6, temperature=0)
    assert r.status in ("completed", "incomplete") and r.output_text and r.usage is not None
    chat = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=6, messages=[
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": png()}},
                                     {"type": "text", "text": "what color?"}]}])
    assert r.output_text == chat.choices[0].message.content
    assert r.usage.input_tokens == chat.usage.prompt_tokens  # type: ignore[union-attr]
    if r.status == "incomplete":
        assert r.incomplete_details is not None and r.incomplete_details.reason == "max_output_tokens"
    plain = client.responses.create(model=MODEL, input="hello", max_output_tokens=3, temperature=0)
    assert plain.output[0].type == "message" and plain.usage is not None and plain.usage.output_tokens <= 3


def test_the_sdks_stream_helper_gets_every_event_in_order(client: openai.OpenAI) -> None:
    schema = {"type": "object", "properties": {"shape": {"enum": ["circle", "square"]}}, "required": ["shape"],
              "additionalProperties": False}  # an answer that ends: the stream closes with response.completed
    kw: Any = {"model": MODEL, "input": _with_image("hi"), "max_output_tokens": 40, "temperature": 0,
               "text": {"format": {"type": "json_schema", "name": "shape", "schema": schema}}}
    whole = client.responses.create(**kw)
    kinds: list[str] = []
    with client.responses.stream(**kw) as s:
        for event in s:
            kinds.append(event.type)
        final = s.get_final_response()
    assert final.output_text == whole.output_text and json.loads(final.output_text)["shape"] in ("circle", "square")
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"] and "response.output_text.delta" in kinds
    cut: list[str] = []  # cut short by max_output_tokens: response.incomplete, as OpenAI sends it
    with client.responses.stream(model=MODEL, input="hi", max_output_tokens=2, temperature=0,
                                 extra_body={"top_k": 1}) as s:
        cut = [event.type for event in s]
    assert cut[-1] in ("response.incomplete", "response.completed")


class _Answer(pydantic.BaseModel):
    color: str = pydantic.Field(pattern="^(red|green)$")
    sure: bool


def test_text_format_json_schema_parses(client: openai.OpenAI) -> None:
    r = client.responses.parse(model=MODEL, input=_with_image("color?"), text_format=_Answer,
                               max_output_tokens=40, temperature=1)
    assert r.status == "completed" and isinstance(r.output_parsed, _Answer)
    obj = client.responses.create(model=MODEL, input="json please", max_output_tokens=60, temperature=0,
                                  text={"format": {"type": "json_object"}})
    if obj.status == "completed":
        assert isinstance(json.loads(obj.output_text), dict)


@pytest.mark.parametrize(("fields", "param", "code"), [
    ({"store": True}, "store", "unsupported_parameter"),
    ({"previous_response_id": "resp_1"}, "previous_response_id", "unsupported_parameter"),
    ({"tools": [{"type": "web_search"}]}, "tools", "unsupported_parameter"),
    ({"reasoning": {"effort": "low"}}, "reasoning", "unsupported_parameter"),
    ({"frobnicate": 1}, "frobnicate", "unknown_parameter"),
])
def test_stateful_and_unknown_fields_are_refused(client: openai.OpenAI, fields: dict[str, Any], param: str,
                                                 code: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.post("/responses", body={"model": MODEL, "input": "hi", **fields}, cast_to=dict)
    error: Any = info.value.body
    assert (error["param"], error["code"]) == (param, code), error
