"""OpenAI's legacy text completions, `POST /v1/completions`, on the same engine: a raw prompt (text or token ids, one
or several), no chat template; `echo`, `n`, `logprobs` (the legacy shape: tokens, token_logprobs, top_logprobs,
text_offset), `stop`, `seed`, penalties, `logit_bias`, streaming. Fields are strict, as on the chat route."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from functools import partial
from typing import Any

from fastapi import FastAPI, Request, params
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import Field, field_validator

from vlmserve.model.sampling import SamplingParams
from vlmserve.model.token_pieces import TokenPieces

from .engine import EngineRequest, Failed, Finished, TextDelta
from .engine.requests import TokenLogprob
from .errors import APIError
from .pipeline import (
    admission,
    check_stream_and_stops,
    choice_sampling,
    logit_bias_pairs,
    max_tokens_for,
    sampling_of,
    usage_of,
)
from .schemas import EXTRA, StopStrings, StreamOptions, _refuse_unless_neutral, _Strict, sampling_params
from .state import ServerState
from .streaming import ChoiceStreams, sse


class CompletionRequest(_Strict):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(min_length=1)
    model: str | None = None
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for this route; null: the rest of the context
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=128)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    logprobs: int | None = Field(None, ge=0, le=5)  # the legacy form: how many alternatives per token
    echo: bool = False
    stop: StopStrings = Field(default_factory=list)
    presence_penalty: float | None = Field(0.0, ge=-2, le=2)
    frequency_penalty: float | None = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = Field(None, max_length=1024)
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    user: str | None = None  # annotation
    best_of: int | None = None  # only equal to n (or 1): no server-side ranking
    suffix: str | None = None  # refused unless empty: no fill-in-the-middle
    top_k: int | None = Field(None, ge=0, lt=2**63, json_schema_extra=EXTRA)
    repetition_penalty: float | None = Field(None, gt=0, le=10, json_schema_extra=EXTRA)
    ignore_eos: bool = Field(False, json_schema_extra=EXTRA)
    cache_salt: str | None = Field(None, max_length=256, json_schema_extra=EXTRA)

    def to_sampling_params(self, defaults: Mapping[str, Any], logit_bias: tuple[tuple[int, float], ...] = ()
                           ) -> SamplingParams:
        return sampling_params(defaults, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                               seed=self.seed, presence=self.presence_penalty, frequency=self.frequency_penalty,
                               repetition=self.repetition_penalty, logit_bias=logit_bias)

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value: str | None) -> str | None:
        return _refuse_unless_neutral("suffix", value, (None, ""))  # type: ignore[return-value]


def _legacy_logprobs(pieces: TokenPieces, logprobs: list[TokenLogprob], offset: int) -> dict[str, Any]:
    """The legacy `logprobs` object of these tokens; text offsets count from `offset`."""
    tokens, values, tops, offsets = [], [], [], []
    for lp in logprobs:
        text = pieces.piece(lp.token_id)[0]
        tokens.append(text)
        values.append(max(lp.logprob, -9999.0))
        top: dict[str, float] = {}
        for t, v in lp.top:  # best first; tokens whose text is alike (partial UTF-8) keep the likeliest
            top.setdefault(pieces.piece(t)[0], max(v, -9999.0))
        tops.append(top)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def install_completion_routes(app: FastAPI, state: ServerState, auth: list[params.Depends],
                              cache_salt: Callable[[Request, str | None], str],
                              check_model: Callable[[str | None], None]) -> None:
    settings = state.settings

    @app.post("/v1/completions", response_model=None, dependencies=auth)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        rid = f"cmpl-{uuid.uuid4().hex}"
        check_model(body.model)
        if body.best_of not in (None, 1, body.n):
            raise APIError(400, "best_of other than n is not supported", param="best_of", code="unsupported_value")
        if body.echo and body.logprobs is not None:
            raise APIError(400, "echo with logprobs (the prompt's own logprobs) is not supported", param="echo",
                           code="unsupported_value")
        check_stream_and_stops(settings, body.stream, body.stream_options, body.stop)
        engine, preparer = state.require_ready()
        tokenizer = preparer.tokenizer
        raw = body.prompt
        texts_in = [raw] if isinstance(raw, str) else [p for p in raw if isinstance(p, str)]
        longest = max((len(t.encode("utf-8", errors="replace")) for t in texts_in), default=0)
        if longest // tokenizer.max_token_bytes > engine.max_model_len:  # refused before any tokenizing
            raise APIError(400, f"a prompt is at least {longest // tokenizer.max_token_bytes} tokens; the context is "
                           f"{engine.max_model_len}", param="prompt", code="context_length_exceeded")
        prompts: list[list[int]]
        if isinstance(raw, str):
            prompts = [tokenizer.encode_text(raw, add_special_tokens=True)]
        elif all(isinstance(p, str) for p in raw):
            prompts = [tokenizer.encode_text(p, add_special_tokens=True) for p in raw]  # type: ignore[arg-type]
        elif all(isinstance(p, int) for p in raw):
            prompts = [list(raw)]  # type: ignore[arg-type]
        else:
            prompts = [list(p) for p in raw]  # type: ignore[arg-type]
        if len(prompts) * body.n > settings.max_n:
            raise APIError(400, f"prompts x n is at most {settings.max_n} here (--max-n)", param="n",
                           code="invalid_value")
        if any(not p for p in prompts) or any(t < 0 or t >= engine.vocab_size for p in prompts for t in p):
            raise APIError(400, f"prompt token ids must be in 0..{engine.vocab_size - 1}", param="prompt",
                           code="invalid_value")
        texts = [tokenizer.decode(p) for p in prompts] if body.echo else [""] * len(prompts)
        salt = cache_salt(request, body.cache_salt)
        with admission(engine):
            sampling = sampling_of(state, partial(body.to_sampling_params,
                                                 logit_bias=logit_bias_pairs(engine, body.logit_bias)))
            groups = []
            for k, ids in enumerate(prompts):
                max_tokens = max_tokens_for(engine, len(ids), body.max_tokens)
                reqs = [EngineRequest(f"{rid}-{k}-{i}", ids, (), choice_sampling(sampling, i), max_tokens, body.stop,
                                      ignore_eos=body.ignore_eos, cache_salt=salt, logprobs=body.logprobs)
                        for i in range(body.n)]
                try:
                    groups.append(ChoiceStreams(engine, reqs))
                except Exception as e:
                    for g in groups:
                        g.close()
                    raise APIError.from_exception(e) from e
        pieces = tokenizer.pieces
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_stream(groups, rid, state.model_id, body, texts, pieces, include_usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        choices: list[dict[str, Any]] = []
        finals: list[list[Finished]] = []
        for k, group in enumerate(groups):
            got = await group.collect(request)
            if got is None:
                for g in groups:
                    g.close()
                return Response(status_code=499)
            if isinstance(got[0], Failed):
                raise APIError.from_exception(got[0].error)
            finals.append([f for f in got if isinstance(f, Finished)])
            for i, f in enumerate(finals[-1]):
                logprobs = (_legacy_logprobs(pieces, list(f.logprobs), len(texts[k]))
                            if body.logprobs is not None else None)
                choices.append({"index": k * body.n + i, "text": texts[k] + f.text, "logprobs": logprobs,
                                "finish_reason": f.finish_reason})
        usage = _total_usage(finals)
        return JSONResponse({"id": rid, "object": "text_completion", "created": int(time.time()),
                             "model": state.model_id, "choices": choices, "usage": usage},
                            headers={"X-Request-Id": rid})


def _total_usage(groups: list[list[Finished]]) -> dict[str, Any]:
    """Every prompt counted once (its n choices share it), every completion."""
    parts = [usage_of(*g) for g in groups if g]  # (no images on this route)
    prompt = sum(u.prompt_tokens for u in parts)
    completion = sum(u.completion_tokens for u in parts)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _stream(groups: list[ChoiceStreams], rid: str, model: str, body: CompletionRequest, texts: list[str],
                  pieces: TokenPieces, include_usage: bool) -> AsyncIterator[str]:
    created = int(time.time())

    def chunk(index: int, text: str, finish: str | None = None, logprobs: dict[str, Any] | None = None) -> str:
        return sse({"id": rid, "object": "text_completion", "created": created, "model": model,
                    "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}]})

    finals: list[list[Finished]] = []
    for k, group in enumerate(groups):  # prompt by prompt; each prompt's choices interleave
        finals.append([])
        offsets = [len(texts[k])] * body.n
        if texts[k]:
            for i in range(body.n):
                yield chunk(k * body.n + i, texts[k])
        async for i, event in group.events():
            index = k * body.n + i
            if isinstance(event, TextDelta):
                logprobs = (_legacy_logprobs(pieces, list(event.logprobs), offsets[i])
                            if body.logprobs is not None else None)
                offsets[i] += len(event.text)
                yield chunk(index, event.text, logprobs=logprobs)
            elif isinstance(event, Finished):
                finals[-1].append(event)
                yield chunk(index, "", event.finish_reason)
            elif isinstance(event, Failed):
                yield sse(APIError.from_exception(event.error).body_text())
                for g in groups:
                    g.close()
                yield sse("[DONE]")
                return
    if include_usage:
        yield sse({"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [],
                   "usage": _total_usage(finals)})
    yield sse("[DONE]")
