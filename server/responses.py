"""OpenAI's Responses API, `POST /v1/responses`, in the stateless subset clients use: `input` as text or messages
(`input_text` and `input_image` parts), `instructions`, `max_output_tokens`, `temperature`, `top_p`, `text.format`
(json_schema / json_object through the grammar engine), and the streaming event sequence the `openai` SDK's
`responses.stream()` consumes. Nothing is stored: `store: true`, `previous_response_id` and tools are refused."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, Literal

from fastapi import FastAPI, Request, params
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import Field, ValidationInfo, field_validator

from vlmserve.model.sampling import SamplingParams

from .engine import EngineRequest, Failed, Finished, TextDelta
from .engine.structured import grammar_from
from .errors import APIError
from .inputs import ImageRef, check_image_role
from .output_format import compile_grammar
from .pipeline import (
    admission,
    check_image_count,
    encode,
    fetch_images,
    image_plans,
    max_tokens_for,
    prepare_images,
    sampling_of,
    submit,
)
from .schemas import EXTRA, _refuse_unless_neutral, _Strict, sampling_params
from .state import ServerState
from .streaming import EventStream, collect, sse


class InputText(_Strict):
    type: Literal["input_text", "output_text"]
    text: str
    annotations: list[Any] | None = None  # an earlier answer's, sent back as history
    logprobs: list[Any] | None = None


class InputImage(_Strict):
    type: Literal["input_image"]
    image_url: str = Field(max_length=64 * 1024**2)
    detail: Literal["auto", "low", "high"] | None = None


class InputMessage(_Strict):
    type: Literal["message"] | None = None
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[InputText | InputImage]
    id: str | None = None  # an earlier output item's, sent back as history
    status: str | None = None


class TextFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = Field(None, max_length=64)
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None
    description: str | None = None

    model_config = _Strict.model_config | {"populate_by_name": True}


class TextOptions(_Strict):
    format: TextFormat | None = None
    verbosity: Literal["medium"] | None = None  # only the default


_NEUTRAL: dict[str, tuple[object, ...]] = {
    "store": (None, False), "previous_response_id": (None,), "tools": (None, []), "tool_choice": (None, "none", "auto"),
    "reasoning": (None,), "include": (None, []), "background": (None, False), "truncation": (None, "disabled"),
    "top_logprobs": (None, 0), "prompt": (None,), "conversation": (None,),
}


class ResponsesRequest(_Strict):
    input: str | list[InputMessage] = Field(min_length=1)
    model: str | None = None
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stream: bool | None = False
    text: TextOptions | None = None
    # annotations
    user: str | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    parallel_tool_calls: bool | None = None
    # not implemented: refused unless neutral
    store: Any = None
    previous_response_id: Any = None
    tools: Any = None
    tool_choice: Any = None
    reasoning: Any = None
    include: Any = None
    background: Any = None
    truncation: Any = None
    top_logprobs: Any = None
    prompt: Any = None
    conversation: Any = None
    # our extras
    seed: int | None = Field(None, ge=-(2**63), lt=2**63, json_schema_extra=EXTRA)
    top_k: int | None = Field(None, ge=0, lt=2**63, json_schema_extra=EXTRA)
    cache_salt: str | None = Field(None, max_length=256, json_schema_extra=EXTRA)

    def to_sampling_params(self, defaults: Mapping[str, Any]) -> SamplingParams:
        return sampling_params(defaults, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                               seed=self.seed)

    @field_validator(*_NEUTRAL)
    @classmethod
    def _unsupported(cls, value: object, info: ValidationInfo) -> object:
        assert info.field_name is not None
        return _refuse_unless_neutral(info.field_name, value, _NEUTRAL[info.field_name])


def _messages(body: ResponsesRequest) -> tuple[list[dict[str, Any]], list[ImageRef]]:
    """Tokenizer messages and the images in order."""
    out: list[dict[str, Any]] = [{"role": "system", "content": body.instructions}] if body.instructions else []
    urls: list[ImageRef] = []
    items = [InputMessage(role="user", content=body.input)] if isinstance(body.input, str) else body.input
    for i, item in enumerate(items):
        role = "system" if item.role == "developer" else item.role
        if isinstance(item.content, str):
            out.append({"role": role, "content": item.content})
            continue
        parts: list[dict[str, Any]] = []
        for j, part in enumerate(item.content):
            if isinstance(part, InputImage):
                check_image_role(role, f"input.{i}.content.{j}")
                urls.append(ImageRef(part.image_url, f"input.{i}.content.{j}.image_url", part.detail))
                parts.append({"type": "image"})
            else:
                parts.append({"type": "text", "text": part.text})
        out.append({"role": role, "content": parts})
    return out, urls


def install_responses_routes(app: FastAPI, state: ServerState, auth: list[params.Depends],
                             cache_salt: Callable[[Request, str | None], str],
                             check_model: Callable[[str | None], None]) -> None:
    @app.post("/v1/responses", response_model=None, dependencies=auth)
    async def responses(body: ResponsesRequest, request: Request) -> Response:
        rid = f"resp_{uuid.uuid4().hex}"
        check_model(body.model)
        messages, urls = _messages(body)
        fmt = body.text.format if body.text else None
        grammar = None
        if fmt is not None and fmt.type != "text":
            schema = fmt.schema_ if fmt.type == "json_schema" else {"type": "object"}
            if schema is None:
                raise APIError(400, "text.format json_schema needs its schema", param="text.format",
                               code="invalid_value")
            try:
                grammar = grammar_from("json_schema", json.dumps(schema))
            except Exception as e:
                raise APIError(400, f"text.format: {str(e)[:300]}", param="text.format", code="invalid_value") from e
        engine, _ = state.require_ready()
        salt = cache_salt(request, body.cache_salt)
        with admission(engine):
            check_image_count(state, len(urls), "input")
            datas = await fetch_images(state, [(ref.url, ref.param) for ref in urls])
            plans = await image_plans(state, urls, "input", datas)
            encoded = await encode(state, messages, None, [p.slots for p in plans])
            max_tokens = max_tokens_for(engine, len(encoded.input_ids), body.max_output_tokens)
            images = await prepare_images(state, [(d, ref.param) for d, ref in zip(datas, urls, strict=True)], salt,
                                          plans)
            if grammar is not None:
                await compile_grammar(engine, grammar, "text.format")
            sampling = sampling_of(state, body.to_sampling_params)
            stream = submit(engine, EngineRequest(rid, encoded.input_ids, images, sampling, max_tokens,
                                                  cache_salt=salt, grammar=grammar))
        shell = _Shell(rid, state.model_id, body, int(time.time()))
        if body.stream:
            return StreamingResponse(_events(stream, shell), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        final = await collect(stream, request)
        if final is None:
            return Response(status_code=499)
        if isinstance(final, Failed):
            raise APIError.from_exception(final.error)
        return JSONResponse(shell.response(final), headers={"X-Request-Id": rid})


class _Shell:
    """The response object around one answer, as it is in progress and once finished."""

    def __init__(self, rid: str, model: str, body: ResponsesRequest, created: int) -> None:
        self.rid, self.model, self.body, self.created = rid, model, body, created
        self.item_id = f"msg_{rid.removeprefix('resp_')}"

    def item(self, text: str | None, status: str) -> dict[str, Any]:
        content = [] if text is None else [self.part(text)]
        return {"type": "message", "id": self.item_id, "status": status, "role": "assistant", "content": content}

    @staticmethod
    def part(text: str) -> dict[str, Any]:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

    def response(self, final: Finished | None) -> dict[str, Any]:
        body = self.body
        fmt = body.text.format.model_dump(by_alias=True, exclude_none=True) if body.text and body.text.format else {
            "type": "text"}
        out: dict[str, Any] = {
            "id": self.rid, "object": "response", "created_at": self.created, "model": self.model,
            "status": "in_progress", "error": None, "incomplete_details": None, "instructions": body.instructions,
            "max_output_tokens": body.max_output_tokens, "temperature": body.temperature, "top_p": body.top_p,
            "output": [], "parallel_tool_calls": True, "tool_choice": "auto", "tools": [], "store": False,
            "text": {"format": fmt}, "metadata": body.metadata or {}, "usage": None,
        }
        if final is not None:
            length = final.finish_reason == "length"
            u = final.usage
            out.update(status="incomplete" if length else "completed",
                       incomplete_details={"reason": "max_output_tokens"} if length else None,
                       output=[self.item(final.text, "incomplete" if length else "completed")],
                       usage={"input_tokens": u.prompt_tokens,
                              "input_tokens_details": {"cached_tokens": u.cached_tokens},
                              "output_tokens": u.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                              "total_tokens": u.total_tokens})
        return out


async def _events(stream: EventStream, shell: _Shell) -> AsyncIterator[str]:
    """response.created, in_progress, the item and its text part added, text deltas, then everything done."""
    seq = 0

    def event(kind: str, **fields: Any) -> str:
        nonlocal seq
        seq += 1
        return f"event: {kind}\n" + sse({"type": kind, "sequence_number": seq - 1, **fields})

    at = {"item_id": shell.item_id, "output_index": 0, "content_index": 0}
    yield event("response.created", response=shell.response(None))
    yield event("response.in_progress", response=shell.response(None))
    yield event("response.output_item.added", output_index=0, item=shell.item(None, "in_progress"))
    yield event("response.content_part.added", part=shell.part(""), **at)
    async for ev in stream:
        if isinstance(ev, TextDelta):
            yield event("response.output_text.delta", delta=ev.text, logprobs=[], **at)
        elif isinstance(ev, Finished):
            done = shell.response(ev)
            status = done["output"][0]["status"]
            yield event("response.output_text.done", text=ev.text, logprobs=[], **at)
            yield event("response.content_part.done", part=shell.part(ev.text), **at)
            yield event("response.output_item.done", output_index=0, item=shell.item(ev.text, status))
            yield event("response.completed" if status == "completed" else "response.incomplete", response=done)
        elif isinstance(ev, Failed):
            error = APIError.from_exception(ev.error)
            yield event("error", code=error.code, message=error.message, param=error.param)
