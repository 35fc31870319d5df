"""Ollama's API on the same engine: /api/chat, /api/generate (NDJSON streaming by default), /api/tags, /api/show,
/api/ps, /api/version. The served model answers to its name and to `NAME:latest`; errors have Ollama's shape,
`{"error": "..."}`, with the status codes the OpenAI routes use. The official `ollama` client works unmodified."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from importlib import metadata
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError

from vlmserve.model.serving_weights import PackedLinear

from .engine import EngineRequest, Failed, Finished, TextDelta
from .engine.structured import grammar_from
from .errors import APIError
from .inputs import ImageRef, check_image_role
from .ollama_schemas import ChatRequest, GenerateRequest, Options, ShowRequest
from .output_format import compile_grammar
from .pipeline import (
    admission,
    check_prompt_floor,
    encode,
    image_plans,
    max_tokens_for,
    prepare_images,
    sampling_of,
    submit,
)
from .state import ServerState
from .streaming import EventStream, collect
from .tools import ToolUse, tool_use_of

M = TypeVar("M", bound=BaseModel)


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def _body(request: Request, model: type[M]) -> M:
    try:
        data = await request.json()
    except (ValueError, UnicodeDecodeError):
        raise APIError(400, "the body is not valid JSON") from None
    try:
        return model.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise APIError(400, f"{where + ': ' if where else ''}{first.get('msg', 'invalid value')}") from None


def install_ollama_routes(app: FastAPI, state: ServerState, authorize: Callable[[Request], None],
                          cache_salt: Callable[[Request, str | None], str]) -> None:
    settings = state.settings

    def names() -> tuple[str, str]:
        return state.model_id, f"{state.model_id}:latest"

    def check_model(name: str) -> None:
        if name not in names():
            raise APIError(404, f"model {name!r} not found (this server serves {state.model_id!r})")

    def weights() -> tuple[int, int, str]:
        """(parameters, bytes, dtype) of the served model, packed matrices included."""
        if state.engine is None:
            return 0, 0, ""
        model = state.engine.model
        first = next(model.parameters())
        numel = sum(p.numel() for p in model.parameters()) + sum(
            m.in_features * m.out_features for m in model.modules() if isinstance(m, PackedLinear))
        return numel, numel * first.element_size(), str(first.dtype).removeprefix("torch.")

    def details() -> dict[str, Any]:
        numel, _, dtype = weights()
        return {"parent_model": "", "format": "safetensors", "family": "llava", "families": ["llava"],
                "parameter_size": f"{numel / 1e6:.1f}M", "quantization_level": dtype.upper()}

    def card() -> dict[str, Any]:
        return {"name": names()[1], "model": names()[1], "size": weights()[1], "details": details(),
                "digest": hashlib.sha256(state.model_id.encode()).hexdigest(),
                "modified_at": datetime.fromtimestamp(state.created, UTC).isoformat().replace("+00:00", "Z")}

    def guarded(route: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
        """Authorization, then the route; every error in Ollama's shape, whatever raised it."""
        async def run(request: Request) -> Response:
            try:
                authorize(request)
                return await route(request)
            except APIError as e:
                return _error(e.status, e.message)
        run.__name__ = route.__name__
        return run

    async def version(request: Request) -> Response:
        try:
            return JSONResponse({"version": metadata.version("vlmserve")})
        except metadata.PackageNotFoundError:
            return JSONResponse({"version": "0.0.0"})

    async def tags(request: Request) -> Response:
        return JSONResponse({"models": [card()]})

    async def ps(request: Request) -> Response:
        engine, _ = state.require_ready()
        on_gpu = next(engine.model.parameters()).device.type == "cuda"
        vram = card()["size"] + engine.kv_cache_bytes if on_gpu else 0
        return JSONResponse({"models": [{**card(), "expires_at": "2999-12-31T23:59:59Z", "size_vram": vram,
                                         "context_length": engine.max_model_len}]})

    async def show(request: Request) -> Response:
        body: ShowRequest = await _body(request, ShowRequest)
        check_model(body.model)
        engine, preparer = state.require_ready()
        return JSONResponse({
            "modelfile": f"FROM {state.model_id}\n", "parameters": "", "template": preparer.tokenizer.chat_template,
            "details": details(), "capabilities": ["completion", "vision"],
            "model_info": {"general.architecture": "llava", "llava.context_length": engine.max_model_len,
                           "general.parameter_count": weights()[0]},
            "modified_at": card()["modified_at"],
        })

    async def chat(request: Request) -> Response:
        await check_prompt_floor(state, request)
        body: ChatRequest = await _body(request, ChatRequest)
        check_model(body.model)
        messages: list[dict[str, Any]] = []
        images: list[tuple[bytes, str]] = []
        for i, m in enumerate(body.messages):
            if m.images:
                check_image_role(m.role, f"messages.{i}.images")
            if m.tool_calls and m.role != "assistant":
                raise APIError(400, f"only assistant messages carry tool_calls (message {i} is {m.role})")
            if m.tool_name is not None and m.role != "tool":
                raise APIError(400, f"only tool messages carry tool_name (message {i} is {m.role})")
            images += [(_image(b64, f"messages.{i}.images.{j}"), f"messages.{i}.images.{j}")
                       for j, b64 in enumerate(m.images or [])]
            parts = [{"type": "image"} for _ in m.images or []]
            turn: dict[str, Any] = {"role": m.role, "content": [*parts, {"type": "text", "text": m.content}]
                                    if parts else m.content}
            if m.tool_calls:
                turn["tool_calls"] = [{"id": c.id or f"call_{k}", "type": "function", "function": {
                    "name": c.function.name, "arguments": json.dumps(c.function.arguments, ensure_ascii=False)}}
                    for k, c in enumerate(m.tool_calls)]
            if m.role == "tool":
                turn["tool_call_id"] = m.tool_name or ""
            messages.append(turn)
        if not messages:
            raise APIError(400, "messages must not be empty")
        _, preparer = state.require_ready()
        if any(m.role == "tool" or m.tool_calls for m in body.messages) and not preparer.tokenizer.renders_tools:
            raise APIError(400, "this model's chat template does not render tool calls or tool messages")
        tools = tool_use_of(body.tools or [], None, None, preparer.tokenizer, state.tool_parser)
        return await _generate(request, body, messages, images, "message", tools)

    async def generate(request: Request) -> Response:
        body: GenerateRequest = await _body(request, GenerateRequest)
        check_model(body.model)
        images = [(_image(b64, f"images.{j}"), f"images.{j}") for j, b64 in enumerate(body.images or [])]
        content: list[dict[str, Any]] = [{"type": "image"} for _ in images] + [{"type": "text", "text": body.prompt}]
        messages = ([{"role": "system", "content": body.system}] if body.system else []) + [
            {"role": "user", "content": content}]
        return await _generate(request, body, messages, images, "response")

    def _image(b64: str, param: str) -> bytes:
        if len(b64) > settings.max_image_bytes * 4 // 3 + 4:
            raise APIError(413, f"{param}: an image over {settings.max_image_bytes} bytes")
        try:
            return base64.b64decode(b64.split(",", 1)[1] if b64.startswith("data:") else b64, validate=True)
        except (binascii.Error, ValueError):
            raise APIError(400, f"{param}: not base64") from None

    async def _generate(request: Request, body: ChatRequest | GenerateRequest, messages: list[dict[str, Any]],
                        images: list[tuple[bytes, str]], field: str, tools: ToolUse | None = None) -> Response:
        rid = f"ollama-{uuid.uuid4().hex}"
        t0 = time.perf_counter_ns()
        options = body.options or Options()
        if options.stop is not None and len(options.stop) > settings.max_stop_sequences:
            raise APIError(400, f"options.stop: at most {settings.max_stop_sequences} stop sequences")
        if options.num_predict == 0:
            raise APIError(400, "options.num_predict must be positive, -1 or -2")
        engine, _ = state.require_ready()
        if options.num_ctx is not None and options.num_ctx > engine.max_model_len:
            raise APIError(400, f"options.num_ctx: the context here is {engine.max_model_len} tokens")
        grammar = None
        if body.format:
            schema = {"type": "object"} if body.format == "json" else body.format
            try:
                grammar = grammar_from("json_schema", json.dumps(schema))
            except Exception as e:
                raise APIError(400, f"format: {str(e)[:300]}") from e
        salt = cache_salt(request, None)
        with admission(engine):
            plans = await image_plans(state, [ImageRef("", param) for _, param in images], "images",
                                      [data for data, _ in images])
            encoded = await encode(state, messages, tools.tools if tools is not None else None,
                                   [p.slots for p in plans])
            requested = options.num_predict if options.num_predict and options.num_predict > 0 else None
            max_tokens = max_tokens_for(engine, len(encoded.input_ids), requested)
            prepared = await prepare_images(state, images, salt, plans)
            if tools is not None and grammar is not None:  # the format would leave the model no way to call
                raise APIError(400, "format together with tools is not supported")
            if tools is not None and tools.grammar is not None:  # strict functions constrain the answer
                grammar = tools.grammar
            if grammar is not None:
                await compile_grammar(engine, grammar, "format")
            sampling = sampling_of(state, options.to_sampling_params)
            req = EngineRequest(rid, encoded.input_ids, prepared, sampling, max_tokens, options.stop or (),
                                cache_salt=salt, grammar=grammar)
            stream = submit(engine, req)
        model = names()[1] if body.model.endswith(":latest") else body.model
        if body.stream:
            return StreamingResponse(_ndjson(stream, model, field, t0, tools), media_type="application/x-ndjson")
        final = await collect(stream, request)
        if final is None:
            return Response(status_code=499)
        if isinstance(final, Failed):
            raise APIError.from_exception(final.error)
        if tools is None:
            return JSONResponse(_closing(final, model, field, t0, final.text, None))
        content, calls = _tool_answer(tools, final.text)
        return JSONResponse(_closing(final, model, field, t0, content, None, calls))

    for path, route in (("/api/show", show), ("/api/chat", chat), ("/api/generate", generate)):
        app.add_api_route(path, guarded(route), methods=["POST"], response_model=None)
    for path, route in (("/api/version", version), ("/api/tags", tags), ("/api/ps", ps)):
        app.add_api_route(path, guarded(route), methods=["GET"], response_model=None)


def _piece(model: str, field: str, text: str) -> dict[str, Any]:
    piece: Any = {"role": "assistant", "content": text} if field == "message" else text
    return {"model": model, "created_at": _now(), field: piece, "done": False}


def _tool_answer(tools: ToolUse, text: str) -> tuple[str, list[dict[str, Any]]]:
    """An answer's content and its calls in Ollama's shape (`arguments` an object); a call whose arguments are no
    JSON object stays in the content as the model wrote it."""
    parsed = tools.parser.parse(text, final=True, names=tools.names)
    content = parsed.content
    calls: list[dict[str, Any]] = []
    for call in parsed.calls[: tools.limit]:
        try:
            arguments = json.loads(call.arguments or "{}")
        except ValueError:
            arguments = None
        if isinstance(arguments, dict):
            calls.append({"function": {"index": len(calls), "name": call.name, "arguments": arguments}})
        else:
            content += call.arguments
    return content, calls


def _closing(final: Finished, model: str, field: str, t0: int, text: str, first_ns: int | None,
             calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The last object: the whole answer (or, streamed, nothing more), why it ended, counts and durations (ns)."""
    now = time.perf_counter_ns()
    first = first_ns if first_ns is not None else now
    out = _piece(model, field, text)
    if calls:
        out[field]["tool_calls"] = calls
    out.update(done=True, done_reason="length" if final.finish_reason == "length" else "stop",
               total_duration=now - t0, load_duration=0, prompt_eval_count=final.usage.prompt_tokens,
               prompt_eval_duration=first - t0, eval_count=final.usage.completion_tokens, eval_duration=now - first)
    return out


async def _ndjson(stream: EventStream, model: str, field: str, t0: int, tools: ToolUse | None = None
                 ) -> AsyncIterator[str]:
    """Ollama's stream: a piece per delta, then the closing object. With tools, pieces carry the content as the
    parser reads it, and the calls come whole in one piece before the close, as Ollama sends them."""
    first_ns: int | None = None
    reader = tools.stream() if tools is not None else None
    async for event in stream:
        if isinstance(event, TextDelta):
            first_ns = first_ns or time.perf_counter_ns()
            if reader is None:
                yield json.dumps(_piece(model, field, event.text), ensure_ascii=False) + "\n"
            for delta in reader.feed(event.text) if reader is not None else ():
                if delta.get("content"):
                    yield json.dumps(_piece(model, field, delta["content"]), ensure_ascii=False) + "\n"
        elif isinstance(event, Finished):
            if tools is not None and reader is not None:
                content, calls = _tool_answer(tools, reader.text)
                piece = _piece(model, field, content[reader.content_sent:])  # what the reader still held back
                if calls:
                    piece[field]["tool_calls"] = calls
                if calls or piece[field]["content"]:
                    yield json.dumps(piece, ensure_ascii=False) + "\n"
            yield json.dumps(_closing(event, model, field, t0, "", first_ns), ensure_ascii=False) + "\n"
        elif isinstance(event, Failed):
            yield json.dumps({"error": APIError.from_exception(event.error).message}) + "\n"
