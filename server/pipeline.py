"""The steps every generation route shares, each a 400/429 in the API's shape when it refuses: admission before any
work, prompt encoding and image preparation off the event loop, sampling and budget checks, submission, usage."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from fastapi import Depends, Request, params

from vlmserve.model.prompt import PromptTooLong
from vlmserve.model.sampling import SamplingParams

from .audio_inputs import check_images_supported
from .engine import EngineError, EngineRequest, Finished, ImageInput
from .engine.prepare import ImagePlan, image_hash
from .errors import APIError
from .inputs import ImageRef, image_bytes
from .schemas import PromptTokensDetails, Usage
from .settings import Settings
from .state import ServerState
from .streaming import EventStream

if TYPE_CHECKING:
    from vlmserve.model.prompt import EncodedPrompt

    from .engine.serving import ServingEngine


def usage_of(*finals: Finished) -> Usage:
    """The usage of one prompt's choices: the prompt (and its cached part) once, every choice's completion."""
    u = finals[0].usage
    completion = sum(f.usage.completion_tokens for f in finals)
    return Usage(prompt_tokens=u.prompt_tokens, completion_tokens=completion, total_tokens=u.prompt_tokens + completion,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=u.cached_tokens,
                                                           image_tokens=u.image_tokens))


def check_stream_and_stops(settings: Settings, stream: bool | None, stream_options: object, stops: Sequence[str]
                           ) -> None:
    """OpenAI's rules the chat and completion routes share: stream_options only with stream; at most
    --max-stop-sequences stop strings."""
    if stream_options is not None and not stream:
        raise APIError(400, "stream_options is only allowed when stream is true", param="stream_options",
                       code="invalid_value")
    if len(stops) > settings.max_stop_sequences:
        raise APIError(400, f"at most {settings.max_stop_sequences} stop sequences", param="stop")


def sampling_of(state: ServerState, build: Callable[[Mapping[str, Any]], SamplingParams]) -> SamplingParams:
    """`build(the checkpoint's defaults)`, `build` being a body's `to_sampling_params` (with its other arguments
    bound): a 400 when the values do not fit together."""
    try:
        return build(state.generation_defaults)
    except ValueError as e:
        raise APIError(400, str(e), code="invalid_value") from e


def choice_sampling(sampling: SamplingParams, index: int) -> SamplingParams:
    """Choice `index`'s sampling: a given seed moves on by the index (so the choices differ and each repeats)."""
    if index == 0 or sampling.seed is None:
        return sampling
    return replace(sampling, seed=(sampling.seed + index + 2**63) % 2**64 - 2**63)


@contextmanager
def admission(engine: ServingEngine) -> Iterator[None]:
    """Admission before any expensive work: a place in the queue is held while the request is prepared (so a burst
    is refused here, before image decoding) and given back once it is submitted or refused."""
    try:
        engine.reserve()
    except EngineError as e:
        raise APIError.from_exception(e) from e
    try:
        yield
    finally:
        engine.unreserve()


def logit_bias_pairs(engine: ServingEngine, bias: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
    """OpenAI's logit_bias as (token id, bias) pairs, each id checked against the vocabulary."""
    out = tuple(sorted((int(token), float(value)) for token, value in (bias or {}).items()))
    bad = [token for token, _ in out if token >= engine.vocab_size]
    if bad:
        raise APIError(400, f"logit_bias: token id {bad[0]} is outside the vocabulary (0..{engine.vocab_size - 1})",
                       param="logit_bias", code="invalid_value")
    return out


def max_tokens_for(engine: ServingEngine, prompt_len: int, requested: int | None) -> int:
    try:
        return engine.resolve_max_tokens(prompt_len, requested)
    except EngineError as e:
        raise APIError.from_exception(e) from e


def submit(engine: ServingEngine, req: EngineRequest) -> EventStream:
    try:
        return EventStream(engine, req)
    except EngineError as e:
        raise APIError.from_exception(e) from e


def check_image_count(state: ServerState, count: int, param: str) -> None:
    """400 naming `param` past --max-images-per-request (before any image is fetched)."""
    limit = state.settings.max_images_per_request
    if count > limit:
        raise APIError(400, f"{count} images in one request; the limit is {limit}", param=param,
                       code="too_many_images")


async def image_plans(state: ServerState, refs: Sequence[ImageRef], param: str, datas: Sequence[bytes]
                      ) -> list[ImagePlan]:
    """How each image becomes visual tokens, from its budget (`detail`, `max_image_tokens`) and, for a model whose
    counts depend on it, its size read from the header: known before any pixel work. 400 naming `param` past
    --max-images-per-request, naming the image when no setting fits it or its header is refused, or when they add
    up past --max-mm-tokens-per-request."""
    assert state.preparer is not None
    preparer = state.preparer
    check_image_count(state, len(refs), param)
    check_images_supported(state, refs)  # a model without a vision tower (qwen2_audio): 400 naming the image
    sizes: list[tuple[int, int] | None] = [None] * len(refs)
    if preparer.needs_size:
        loop = asyncio.get_running_loop()
        for i, (ref, data) in enumerate(zip(refs, datas, strict=True)):
            try:
                sizes[i] = await loop.run_in_executor(state.executor, preparer.size, data)
            except Exception as e:
                raise APIError.from_exception(e, param=ref.param) from e
    plans = []
    for ref, size in zip(refs, sizes, strict=True):
        try:
            plans.append(preparer.plan(ref.detail, ref.max_image_tokens, size, len(refs)))
        except EngineError as e:
            raise APIError.from_exception(e, param=ref.param) from e
    counts = [p.tokens for p in plans]
    cap = state.settings.max_mm_tokens_per_request
    if cap is not None and sum(counts) > cap:
        each = ", ".join(map(str, counts))
        raise APIError(400, f"the {len(counts)} images make {sum(counts)} visual tokens ({each}); the limit per "
                       f"request is {cap} (--max-mm-tokens-per-request)", param=refs[0].param,
                       code="too_many_image_tokens")
    return plans


async def fetch_images(state: ServerState, urls: Sequence[tuple[str, str]]) -> list[bytes]:
    """The bytes of each (url, param) (data URLs decoded, allowed remote URLs fetched), concurrently."""
    return list(await asyncio.gather(*(image_bytes(url, param, state.settings) for url, param in urls)))


async def encode(state: ServerState, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                 image_tokens: Sequence[int | Sequence[int]] | None = None, audio_tokens: Sequence[int] = ()
                 ) -> EncodedPrompt:
    """The chat's prompt ids (with the functions it offers, `tools`; each image as its `image_tokens` slots, its
    plan's `slots`), tokenized in the thread pool; one that cannot fit the context is refused before."""
    assert state.preparer is not None and state.engine is not None
    preparer, context = state.preparer, state.engine.max_model_len
    floor = preparer.token_floor(messages)  # cheap: bytes counted, nothing tokenized
    if floor > context:
        raise APIError(400, f"the prompt is at least {floor} tokens; the context is {context}", param="messages",
                       code="context_length_exceeded")
    loop = asyncio.get_running_loop()
    try:
        return await loop.run_in_executor(state.executor, preparer.encode, messages, tools, image_tokens, context,
                                          audio_tokens)
    except PromptTooLong as e:  # the rendered template (tools included) is surely over: refused untokenized
        raise APIError(400, f"the prompt is at least {e.floor} tokens; the context is {context}", param="messages",
                       code="context_length_exceeded") from e
    except ValueError as e:
        raise APIError(400, str(e), param="messages", code="invalid_value") from e


PRECHECK_BYTES = 256 * 1024  # bodies past this are sized up from their raw JSON before they are validated


def raw_chat_floor(state: ServerState, messages: object) -> int:
    """A lower bound on the prompt tokens of OpenAI- or Ollama-style `messages` as they came in, before validation
    (malformed parts count nothing; validation refuses them later)."""
    assert state.preparer is not None
    shaped: list[dict[str, Any]] = []
    for m in messages if isinstance(messages, list) else ():
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, str):
            shaped.append({"content": content})
        elif isinstance(content, list):
            shaped.append({"content": [
                {"type": "image"} if p.get("type") in ("image", "image_url") else
                {"type": "text", "text": p["text"] if isinstance(p.get("text"), str) else ""}
                for p in content if isinstance(p, dict)]})
    return state.preparer.token_floor(shaped)


async def check_prompt_floor(state: ServerState, request: Request) -> None:
    """Refuses a chat far over the context from its raw JSON, before its body is validated: validating 200 000
    one-word messages holds the event loop for most of a second, counting their bytes a few milliseconds. Small
    bodies are left to the normal path (validation is cheap for them)."""
    if state.preparer is None or state.engine is None:
        return
    if int(request.headers.get("content-length") or 0) < PRECHECK_BYTES:
        return
    try:
        body = await request.json()  # parsed once: FastAPI and the Ollama routes reuse it
    except ValueError:
        return  # the route answers malformed JSON itself
    floor = raw_chat_floor(state, body.get("messages") if isinstance(body, dict) else None)
    if floor > state.engine.max_model_len:
        raise APIError(400, f"the prompt is at least {floor} tokens; the context is {state.engine.max_model_len}",
                       param="messages", code="context_length_exceeded")


def prompt_floor_check(state: ServerState) -> params.Depends:
    """`check_prompt_floor` as a route dependency (it runs before FastAPI validates the body)."""

    async def check(request: Request) -> None:
        await check_prompt_floor(state, request)

    dependency: params.Depends = Depends(check)
    return dependency


async def prepare_images(state: ServerState, items: Sequence[tuple[bytes, str]], salt: str,
                         plans: Sequence[ImagePlan]) -> list[ImageInput]:
    """Decode and preprocess each image as its plan says, in the thread pool, never on the event loop: the engine's
    inputs in prompt order, one per view of each image (Gemma 3's pan and scan: the image, then its crops; else one
    per image). An image whose visual tokens are cached is not decoded at all: the request leases the cached tokens
    instead (a view that is cached keeps its lease when the others are processed). An engine that defers images (the
    Ray ingress's) gets each image checked and as bytes: its replica leases or prepares it."""
    assert state.preparer is not None and state.engine is not None
    preparer, engine = state.preparer, state.engine
    loop = asyncio.get_running_loop()

    def one(data: bytes, param: str, plan: ImagePlan) -> list[ImageInput]:
        try:
            return inputs_of(data, plan)
        except Exception as e:
            raise APIError.from_exception(e, param=param) from e

    def inputs_of(data: bytes, plan: ImagePlan) -> list[ImageInput]:
        digest = image_hash(data)
        if engine.defers_images:  # the Ray ingress: checked here, prepared (or leased) by the replica
            return preparer.deferred(data, digest, plan, salt)
        leased = [preparer.leased(digest, engine.lease_image(preparer.image_key(digest, plan, v), salt), plan, v)
                  for v in range(plan.views)]
        if all(lease is not None for lease in leased):
            return [lease for lease in leased if lease is not None]
        t0 = time.perf_counter()
        try:
            views = preparer.image(data, digest, plan)
        finally:
            state.metrics.preprocess.observe(time.perf_counter() - t0)
        return [lease if lease is not None else view for lease, view in zip(leased, views, strict=True)]

    results = await asyncio.gather(*(loop.run_in_executor(state.executor, one, d, p, plan)
                                     for (d, p), plan in zip(items, plans, strict=True)), return_exceptions=True)
    inputs: list[ImageInput] = []
    for result in results:
        if isinstance(result, BaseException):
            raise result
        inputs += result
    return inputs
