"""The frameworks people put in front of an OpenAI-compatible server, unmodified, against the live server:
langchain-openai (structured output, streaming) and litellm (completion, structured output)."""

from __future__ import annotations

import base64
import io
import os
from typing import Any, Literal

import pydantic
import pytest
from live_server import LiveServer
from PIL import Image

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # litellm would fetch its price list otherwise

MODEL = "tiny-llava"


def red_url() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


class Shape(pydantic.BaseModel):
    color: Literal["red", "green", "blue"]
    filled: bool


def _image_message() -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": red_url()}},
                                         {"type": "text", "text": "describe the shape"}]}]


def test_langchain_structured_output_and_streaming(live_server: LiveServer) -> None:
    import langchain_openai
    from langchain_core.messages import HumanMessage

    llm = langchain_openai.ChatOpenAI(model=MODEL, base_url=live_server.url + "/v1", api_key="x", temperature=0,
                                      max_tokens=40, max_retries=0)
    message = HumanMessage(content=_image_message()[0]["content"])
    shape = llm.with_structured_output(Shape, method="json_schema").invoke([message])
    assert isinstance(shape, Shape)
    whole = llm.invoke([message]).content
    streamed = "".join(str(chunk.content) for chunk in llm.stream([message]))
    assert streamed == whole
    with pytest.raises(Exception, match="tools"):  # tools are refused by name, never ignored
        llm.bind_tools([Shape], tool_choice="required").invoke([message])


def test_litellm_completion_and_structured_output(live_server: LiveServer) -> None:
    import litellm
    kw: dict[str, Any] = {"model": f"openai/{MODEL}", "api_base": live_server.url + "/v1", "api_key": "x",
                          "messages": _image_message(), "max_tokens": 40, "temperature": 0}
    plain = litellm.completion(**kw)
    assert plain.choices[0].message.content is not None and plain.usage.completion_tokens <= 40
    structured = litellm.completion(**kw, response_format=Shape)
    assert Shape.model_validate_json(structured.choices[0].message.content)
