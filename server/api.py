"""FastAPI routes: OpenAI chat completions, the native multipart `generate`, models, health, readiness, metrics.

Order of work for a generation request: auth -> parse -> admission (429/503 before anything expensive) -> tokenize
and check the context -> decode and preprocess images in a thread pool -> submit to the engine -> stream back.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from vlmserve.model.token_pieces import TokenPieces

from .audio_inputs import (
    audio_bytes,
    check_audio_supported,
    check_images_supported,
    prepare_audio,
    upload_bytes,
)
from .completions import install_completion_routes
from .engine import EngineError, EngineRequest, Failed, Finished, TextDelta
from .engine.audio_prepare import in_prompt_order
from .errors import APIError, install_error_handlers
from .forms import GENERATE_FIELDS, Form, read_form
from .inputs import AudioRef, ImageRef, chat_input
from .logprobs import choice_logprobs
from .middleware import BodyBudget, BodyLimit, StatusCounter
from .ollama import install_ollama_routes
from .output_format import compile_grammar, grammar_of, schema_grammar
from .pipeline import (
    admission,
    check_image_count,
    check_stream_and_stops,
    choice_sampling,
    encode,
    fetch_images,
    image_plans,
    logit_bias_pairs,
    max_tokens_for,
    prepare_images,
    prompt_floor_check,
    sampling_of,
    submit,
    usage_of,
)
from .replica_header import ReplicaHeader
from .responses import install_responses_routes
from .schemas import (
    MAX_STOP_CHARS,
    ChatCompletion,
    ChatCompletionRequest,
    Choice,
    GenerateResponse,
    ModelCard,
    ModelList,
    ResponseMessage,
)
from .settings import Settings
from .state import ServerState, in_fresh_thread
from .streaming import ChoiceStreams, EventStream, collect, sse
from .tools import ToolUse, tool_use
from .webui import install_ui_routes

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None, load: Callable[[ServerState], Awaitable[None]] | None = None
               ) -> FastAPI:
    """The app; the model loads in the background at startup (/ready answers 503 until it is warm). `load`
    replaces the one-process load (the Ray Serve ingress's engine is remote: server/scale/ingress.py)."""
    settings = settings or Settings()
    state = ServerState(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loader = asyncio.ensure_future(load(state) if load is not None
                                       else in_fresh_thread(state.load, "vlmserve-load"))
        watchdog = asyncio.ensure_future(_watch_engine(state))
        try:
            yield
        finally:
            watchdog.cancel()
            if not loader.done():
                loader.cancel()
            await asyncio.to_thread(state.close)

    app = FastAPI(title="vlmserve", version="0.1.0", lifespan=lifespan,
                  description="A vision-language inference server with an OpenAI-compatible API.")
    app.state.server = state
    install_error_handlers(app)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"],
                           allow_headers=["*"])
    budget = BodyBudget(max(settings.max_body_buffer_mb * 1024**2, settings.max_body_bytes))  # one body always fits
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes, timeout=settings.body_timeout, budget=budget)
    app.add_middleware(StatusCounter, count=lambda route, status: state.metrics.http.labels(route, status).inc())
    app.add_middleware(ReplicaHeader)
    _routes(app, state)
    return app


async def _watch_engine(state: ServerState) -> None:
    """If the engine's loop dies, stop reporting ready and have the process exit non-zero (an orchestrator restarts)."""
    while True:
        await asyncio.sleep(0.5)
        if state.load_error is not None or (state.ready and state.engine is not None and not state.engine.alive):
            cause = state.load_error or (state.engine.error if state.engine else None)
            log.critical("the engine is gone (%r): exiting so that the process is restarted", cause)
            state.ready = False
            if state.on_fatal is not None:
                state.on_fatal()
            return


def _routes(app: FastAPI, state: ServerState) -> None:
    settings = state.settings

    def check_key(request: Request) -> None:
        if not settings.api_keys:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        given = token.strip().encode()
        if scheme.lower() != "bearer" or not any(hmac.compare_digest(given, k.encode()) for k in settings.api_keys):
            raise APIError(401, "missing or invalid API key (Authorization: Bearer <key>)", code="invalid_api_key")

    async def authorize(request: Request) -> None:  # async: FastAPI runs a plain `def` dependency in a worker thread
        check_key(request)

    auth = [Depends(authorize)]

    def cache_salt(request: Request, salt: str | None) -> str:
        """The salt a request's cached prefixes and visual tokens are keyed with: the request's own, and with API
        keys the caller's key too, so that one tenant cannot probe another's prompts or images by timing."""
        if not settings.api_keys:
            return salt or ""
        key = request.headers.get("authorization", "").partition(" ")[2].strip()
        return hashlib.sha256(f"{key}\x00{salt or ''}".encode()).hexdigest()

    install_ollama_routes(app, state, check_key, cache_salt)

    def check_model(name: str | None) -> None:
        if name and name != state.model_id:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {state.model_id!r}",
                           param="model", code="model_not_found")

    install_completion_routes(app, state, auth, cache_salt, check_model)
    install_responses_routes(app, state, auth, cache_salt, check_model)
    if not settings.no_ui:
        install_ui_routes(app)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        if state.is_ready():
            return JSONResponse({"status": "ready", "model": state.model_id})
        reason = "draining" if state.draining else "loading" if state.load_error is None else "failed"
        return JSONResponse({"status": reason}, status_code=503, headers={"Retry-After": "5"})

    @app.get("/metrics")
    async def metrics() -> Response:
        text = generate_latest(state.metrics.registry).decode()
        if state.replica_metrics is not None:  # on Ray Serve: every replica's too, labelled by rank
            text = await state.replica_metrics(text)
        return PlainTextResponse(text, media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=auth)
    async def models() -> ModelList:
        max_len = state.engine.max_model_len if state.engine else None
        return ModelList(data=[ModelCard(id=state.model_id, created=state.created, max_model_len=max_len)])

    @app.get("/v1/models/{model_id:path}", dependencies=auth)
    async def model(model_id: str) -> ModelCard:
        check_model(model_id)
        return ModelCard(id=state.model_id, created=state.created)

    @app.post("/v1/chat/completions", response_model=None, dependencies=[*auth, prompt_floor_check(state)])
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        check_model(body.model)
        if body.n > settings.max_n:
            raise APIError(400, f"n is at most {settings.max_n} here (--max-n)", param="n", code="invalid_value")
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs", code="invalid_value")
        check_stream_and_stops(settings, body.stream, body.stream_options, body.stop)
        engine, preparer = state.require_ready()
        constraint = grammar_of(body)
        tools = tool_use(body, preparer.tokenizer, state.tool_parser)
        if tools is not None and body.logprobs:
            raise APIError(400, "logprobs are not reported together with tools", param="logprobs",
                           code="unsupported_value")
        if tools is not None and tools.grammar is None and constraint is not None:
            raise APIError(400, f"{constraint[1]} together with tools the model may call is not supported (the "
                           "constraint would leave it no way to call them): use tool_choice none or required",
                           param=constraint[1], code="unsupported_value")
        if tools is not None and tools.grammar is not None:
            if constraint is not None:
                raise APIError(400, f"{constraint[1]} cannot constrain an answer that tool_choice or strict tools "
                               "already constrain", param=constraint[1], code="invalid_value")
            constraint = tools.grammar, "tools"
        salt = cache_salt(request, body.cache_salt)
        with admission(engine):
            chat = chat_input(body.messages)
            if chat.has_tool_turns and not preparer.tokenizer.renders_tools:
                raise APIError(400, "this model's chat template does not render tool calls or tool messages",
                               param="messages", code="unsupported_parameter")
            check_image_count(state, len(chat.images), "messages")
            check_images_supported(state, chat.images)
            check_audio_supported(state, chat.audio)
            clips = await prepare_audio(state, [(audio_bytes(ref, settings.max_audio_bytes), ref.format, ref.param)
                                                for ref in chat.audio], salt)  # their token counts: decoded first
            urls = [(ref.url, f"{ref.param}.url") for ref in chat.images]
            datas = await fetch_images(state, urls)
            plans = await image_plans(state, chat.images, "messages", datas)
            encoded = await encode(state, chat.messages, tools.tools if tools is not None else None,
                                   [p.slots for p in plans], [c.num_tokens for c in clips])
            max_tokens = max_tokens_for(engine, len(encoded.input_ids), body.max_completion_tokens or body.max_tokens)
            images = await prepare_images(state, [(d, p) for d, (_, p) in zip(datas, urls, strict=True)], salt, plans)
            images = in_prompt_order(encoded, images, clips)
            if constraint is not None:
                await compile_grammar(engine, *constraint)
            sampling = sampling_of(state, partial(body.to_sampling_params,
                                                 logit_bias=logit_bias_pairs(engine, body.logit_bias)))
            reqs = [EngineRequest(rid if body.n == 1 else f"{rid}-{i}", encoded.input_ids, images,
                                  choice_sampling(sampling, i), max_tokens, body.stop, ignore_eos=body.ignore_eos,
                                  cache_salt=salt, logprobs=(body.top_logprobs or 0) if body.logprobs else None,
                                  grammar=constraint[0] if constraint is not None else None) for i in range(body.n)]
            log.info("%s: %d prompt tokens, %d images, %d audio clips, max_tokens %d, n %d, stream=%s, user=%s", rid,
                     len(encoded.input_ids), len(plans), len(clips), max_tokens, body.n, body.stream,
                     body.user)
            try:
                choices = ChoiceStreams(engine, reqs)
            except EngineError as e:
                raise APIError.from_exception(e) from e
        pieces = preparer.tokenizer.pieces if body.logprobs else None
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_chat_sse(choices, rid, state.model_id, include_usage, pieces, tools),
                                     media_type="text/event-stream", headers=_SSE_HEADERS)
        finals = await choices.collect(request)
        if finals is None:
            return Response(status_code=499)  # the client is gone; nobody reads this
        if isinstance(finals[0], Failed):
            raise APIError.from_exception(finals[0].error)
        done = [f for f in finals if isinstance(f, Finished)]
        messages = [tools.message(f.text) if tools is not None else ResponseMessage(content=f.text) for f in done]
        return JSONResponse(ChatCompletion(
            id=rid, model=state.model_id, usage=usage_of(*done),
            choices=[Choice(index=i, message=m,
                            finish_reason=_finish_reason(f.finish_reason, bool(m.tool_calls), tools),
                            logprobs=choice_logprobs(pieces, f.logprobs) if pieces is not None else None)
                     for i, (f, m) in enumerate(zip(done, messages, strict=True))],
        ).model_dump(), headers={"X-Request-Id": rid})

    @app.post("/v1/generate", response_model=None, dependencies=auth)
    async def generate(request: Request) -> Response:
        rid = f"gen-{uuid.uuid4().hex}"
        form = await read_form(request, settings)
        fields = Form(form)
        unknown = sorted(set(form.keys()) - GENERATE_FIELDS)
        if unknown:
            known = ", ".join(sorted(GENERATE_FIELDS))
            raise APIError(400, f"unknown form field {unknown[0]!r}; the fields are {known}", param=unknown[0],
                           code="unknown_parameter")
        check_model(fields.text("model"))
        prompt = fields.text("prompt")
        if prompt is None:
            raise APIError(400, "the form field 'prompt' is required", param="prompt", code="missing_field")
        uploads = fields.files("image")
        audio_uploads = fields.files("audio")
        stops = fields.texts("stop")
        if len(stops) > settings.max_stop_sequences or any(not s or len(s) > MAX_STOP_CHARS for s in stops):
            raise APIError(400, f"stop: up to {settings.max_stop_sequences} non-empty strings of at most "
                           f"{MAX_STOP_CHARS} characters", param="stop")
        sampling = sampling_of(state, fields.to_sampling_params)
        stream_flag = fields.boolean("stream")
        requested = fields.integer("max_tokens", 1)
        salt_field = fields.text("cache_salt")
        if salt_field is not None and len(salt_field) > 256:
            raise APIError(400, "cache_salt: at most 256 characters", param="cache_salt", code="invalid_value")
        salt = cache_salt(request, salt_field)
        schema_text = fields.text("json_schema")
        grammar = schema_grammar(schema_text) if schema_text else None
        detail = fields.text("detail")
        if detail not in (None, "auto", "low", "high"):
            raise APIError(400, f"detail must be low, high or auto, not {detail[:20]!r}", param="detail",
                           code="invalid_value")
        engine, _ = state.require_ready()
        with admission(engine):
            if grammar is not None:
                await compile_grammar(engine, grammar, "json_schema")
            content: list[dict[str, Any]] = ([{"type": "image"} for _ in uploads] +
                                             [{"type": "audio"} for _ in audio_uploads] +
                                             [{"type": "text", "text": prompt}])  # images first, then audio
            check_image_count(state, len(uploads), "image")
            image_refs = [ImageRef("", f"image.{i}", detail) for i in range(len(uploads))]
            check_images_supported(state, image_refs)
            check_audio_supported(state, [AudioRef("", "", f"audio.{i}") for i in range(len(audio_uploads))])
            clips = await prepare_audio(state, [(await upload_bytes(u, settings.max_audio_bytes, f"audio.{i}"), None,
                                                 f"audio.{i}") for i, u in enumerate(audio_uploads)], salt)
            datas = [await u.read() for u in uploads]
            plans = await image_plans(state, image_refs, "image", datas)
            encoded = await encode(state, [{"role": "user", "content": content}], None, [p.slots for p in plans],
                                   [c.num_tokens for c in clips])
            max_tokens = max_tokens_for(engine, len(encoded.input_ids), requested)
            images = await prepare_images(state, [(d, f"image.{i}") for i, d in enumerate(datas)], salt, plans)
            images = in_prompt_order(encoded, images, clips)
            req = EngineRequest(rid, encoded.input_ids, images, sampling, max_tokens, stops, cache_salt=salt,
                                grammar=grammar)
            log.info("%s: %d prompt tokens, %d images, %d audio clips, max_tokens %d", rid, len(encoded.input_ids),
                     len(uploads), len(clips), max_tokens)
            stream = submit(engine, req)
        if stream_flag:
            return StreamingResponse(_generate_sse(stream, rid), media_type="text/event-stream", headers=_SSE_HEADERS)
        final = await final_of(stream, request)
        if final is None:
            return Response(status_code=499)
        return JSONResponse(GenerateResponse(id=rid, model=state.model_id, text=final.text,
                                             finish_reason=final.finish_reason, usage=usage_of(final)).model_dump(
                                                 exclude={"usage": {"prompt_tokens_details"}}),
                            headers={"X-Request-Id": rid})


_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def final_of(stream: EventStream, request: Request) -> Finished | None:
    """The finished generation of a non-streamed request; None if the client left (it was cancelled)."""
    final = await collect(stream, request)
    if isinstance(final, Failed):
        raise APIError.from_exception(final.error)
    return final


def _finish_reason(reason: str, called: bool, tools: ToolUse | None) -> str:
    """OpenAI's finish_reason: "tool_calls" for an answer that ended by itself after calling functions it chose
    (a function named by tool_choice ends with "stop", as OpenAI's answers do)."""
    return "tool_calls" if called and reason == "stop" and not (tools is not None and tools.named) else reason


async def _chat_sse(choices: ChoiceStreams, rid: str, model: str, include_usage: bool,
                    pieces: TokenPieces | None = None, tools: ToolUse | None = None) -> AsyncIterator[str]:
    """The chunks of a streamed chat answer, every choice's under its index; with `pieces` (logprobs asked), each
    carries its tokens' logprobs; with `tools`, content and tool-call deltas as the parser reads them. The usage
    chunk (if asked) comes once every choice has finished."""
    created = int(time.time())
    calls = [tools.stream() for _ in choices.reqs] if tools is not None else None

    def chunk(index: int, delta: dict[str, Any], finish: str | None = None, logprobs: dict[str, Any] | None = None
              ) -> str:
        body: dict[str, Any] = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                                "choices": [{"index": index, "delta": delta, "finish_reason": finish,
                                             "logprobs": logprobs}]}
        if include_usage:
            body["usage"] = None
        return sse(body)

    for i in range(len(choices.reqs)):
        yield chunk(i, {"role": "assistant", "content": ""})
    finals: list[Finished] = []
    async for i, event in choices.events():
        if isinstance(event, TextDelta) and calls is not None:
            for delta in calls[i].feed(event.text):
                yield chunk(i, delta)
        elif isinstance(event, TextDelta):
            yield chunk(i, {"content": event.text},
                        logprobs=choice_logprobs(pieces, event.logprobs) if pieces is not None else None)
        elif isinstance(event, Finished):
            finals.append(event)
            for delta in calls[i].feed("", final=True) if calls is not None else ():
                yield chunk(i, delta)
            yield chunk(i, {}, _finish_reason(event.finish_reason, calls is not None and calls[i].called, tools))
        elif isinstance(event, Failed):
            yield sse(APIError.from_exception(event.error).body_text())
            break
    if include_usage and len(finals) == len(choices.reqs):
        yield sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [],
                   "usage": usage_of(*finals).model_dump()})
    yield sse("[DONE]")


async def _generate_sse(stream: EventStream, rid: str) -> AsyncIterator[str]:
    async for event in stream:
        if isinstance(event, TextDelta):
            yield sse({"id": rid, "text": event.text})
        elif isinstance(event, Finished):
            yield sse({"id": rid, "finish_reason": event.finish_reason,
                       "usage": usage_of(event).model_dump(exclude={"prompt_tokens_details"})})
        elif isinstance(event, Failed):
            yield sse(APIError.from_exception(event.error).body_text())
    yield sse("[DONE]")
