"""The asynchronous client: the same API as `Client`, awaited."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from types import TracebackType
from typing import Any

import httpx

from ._base import (
    DEFAULT_BASE_URL,
    RETRY_STATUSES,
    ChatStreamState,
    as_timeout,
    chat_body,
    completion_from_chat,
    completion_from_generate,
    connection_error,
    default_headers,
    generate_form,
    normalize_base_url,
    parse_json,
    parse_retry_after,
    pool_limits,
    resolve_api_key,
    retry_delay,
    retryable_transport_error,
)
from .errors import from_response_content
from .types import Completion, ImageInput

log = logging.getLogger("vlmserve_client")
_sleep = asyncio.sleep  # replaced in tests


class AsyncStream:
    """A streamed chat answer: `async for` it for the text deltas; afterwards `.completion` holds the whole answer.

    The request is sent when iteration starts, so errors (typed, like `chat`'s) are raised from the loop. Iterate
    once. Leaving the loop early and calling `aclose()` (or using `async with`) cancels the generation on the server.
    """

    def __init__(self, open_response: Callable[[], Awaitable[httpx.Response]]) -> None:
        self._open = open_response
        self._state = ChatStreamState()
        self._response: httpx.Response | None = None
        self._iterator: AsyncGenerator[str, None] | None = None
        self._completion: Completion | None = None

    def __aiter__(self) -> AsyncIterator[str]:
        if self._iterator is not None:
            raise RuntimeError("an AsyncStream can be iterated only once")
        self._iterator = self._deltas()
        return self._iterator

    async def _deltas(self) -> AsyncGenerator[str, None]:
        response = self._response = await self._open()
        try:
            async for text in response.aiter_text():
                for delta in self._state.feed(text):
                    yield delta
                if self._state.done:
                    break
            else:
                for delta in self._state.end_of_stream():
                    yield delta
            self._completion = self._state.finish()
        except httpx.TransportError as e:
            raise connection_error(e, str(response.request.url)) from e
        finally:
            await response.aclose()

    @property
    def completion(self) -> Completion:
        """The whole answer (text, finish_reason, usage, id, model); available once the stream is exhausted."""
        if self._completion is None:
            raise RuntimeError("the stream has not been read to its end yet")
        return self._completion

    async def aclose(self) -> None:
        """Stop reading and close the connection (the server then cancels the generation)."""
        if self._iterator is not None:
            await self._iterator.aclose()
        if self._response is not None:
            await self._response.aclose()

    async def __aenter__(self) -> AsyncStream:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()


class AsyncClient:
    """Asynchronous client of a vlmserve server (the same API as `Client`, awaited).

    `base_url` is the server root (a trailing `/v1` is accepted and removed). `api_key` defaults to the environment
    variable `VLMSERVE_API_KEY`. 429 and 503 answers (honouring Retry-After, capped) and connection failures are
    retried up to `max_retries` times with exponential backoff from `backoff` seconds plus jitter; other errors are
    raised at once as typed exceptions (see `vlmserve_client.errors`). `model` is the default model of every call
    (None: the server's). `max_connections` caps the connection pool (None: httpx's 100; unused with a
    `transport`). `transport` is handed to httpx (tests use `httpx.MockTransport`).
    """

    def __init__(
        self,
        base_url: str = DEFAULT_BASE_URL,
        *,
        api_key: str | None = None,
        timeout: float | httpx.Timeout = 60.0,
        max_retries: int = 3,
        backoff: float = 0.5,
        model: str | None = None,
        max_connections: int | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = normalize_base_url(base_url)
        self.max_retries = max(0, max_retries)
        self.backoff = backoff
        self.model = model
        self._http = httpx.AsyncClient(base_url=self.base_url, timeout=as_timeout(timeout),
                                  headers=default_headers(resolve_api_key(api_key)), transport=transport,
                                  **pool_limits(max_connections))

    # ------------------------------------------------------------ public API

    async def chat(
        self,
        prompt: str,
        *,
        images: ImageInput | Sequence[ImageInput] = (),
        model: str | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        system: str | None = None,
        response_format: Mapping[str, Any] | None = None,
        extra_body: Mapping[str, Any] | None = None,
        history: Sequence[Mapping[str, Any]] = (),
    ) -> Completion:
        """Ask about images (paths, bytes or PIL images, in order) through POST /v1/chat/completions.

        `response_format` is OpenAI's (`{"type": "json_schema", "json_schema": {"name", "schema"}}` or
        `{"type": "json_object"}`: the answer's text is then JSON); `extra_body`'s fields are added to the request
        body as they are (the server's extras, such as `ignore_eos` or `repetition_penalty`). `history` holds the
        conversation's earlier turns (OpenAI messages; `user_message` builds a user turn with images), sent after
        `system` and before this prompt.
        """
        body = chat_body(prompt, images=images, model=model or self.model, max_tokens=max_tokens,
                         temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop=stop, system=system,
                         response_format=response_format, extra_body=extra_body, history=history, stream=False)
        response = await self._request("POST", "/v1/chat/completions", json=body)
        return completion_from_chat(parse_json(response.content))

    def chat_stream(
        self,
        prompt: str,
        *,
        images: ImageInput | Sequence[ImageInput] = (),
        model: str | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        system: str | None = None,
        response_format: Mapping[str, Any] | None = None,
        extra_body: Mapping[str, Any] | None = None,
        history: Sequence[Mapping[str, Any]] = (),
    ) -> AsyncStream:
        """Like `chat`, streamed: `async for` the returned AsyncStream's text deltas, then read `stream.completion`."""
        body = chat_body(prompt, images=images, model=model or self.model, max_tokens=max_tokens,
                         temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop=stop, system=system,
                         response_format=response_format, extra_body=extra_body, history=history, stream=True)
        return AsyncStream(lambda: self._request("POST", "/v1/chat/completions", json=body, stream=True))

    async def generate(
        self,
        prompt: str,
        *,
        images: ImageInput | Sequence[ImageInput] = (),
        model: str | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
    ) -> Completion:
        """Ask about images through the native POST /v1/generate (multipart upload, no base64)."""
        data, files = generate_form(prompt, images=images, model=model or self.model, max_tokens=max_tokens,
                                    temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop=stop)
        response = await self._request("POST", "/v1/generate", data=data, files=files)
        return completion_from_generate(parse_json(response.content))

    async def models(self) -> list[str]:
        """The ids of the served models (GET /v1/models)."""
        body = parse_json((await self._request("GET", "/v1/models")).content)
        return [m["id"] for m in body.get("data", [])]

    async def ready(self) -> bool:
        """True if the server is up and its model loaded (GET /ready is 200); False otherwise, also if unreachable."""
        try:
            return (await self._http.get("/ready")).status_code == 200
        except httpx.TransportError:
            return False

    async def close(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    async def aclose(self) -> None:
        """The same as `close`."""
        await self.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        await self.close()

    # ------------------------------------------------------------ transport with retries

    async def _request(self, method: str, path: str, *, stream: bool = False, **kwargs: Any) -> httpx.Response:
        """Send with retries; returns a 2xx response (streamed responses are left open) or raises a typed error."""
        attempt = 0
        while True:
            request = self._http.build_request(method, path, **kwargs)
            try:
                response = await self._http.send(request, stream=stream)
            except httpx.TransportError as e:
                if attempt < self.max_retries and retryable_transport_error(e):
                    delay = retry_delay(attempt, self.backoff, None)
                    log.info("%s %s: %r; retry %d in %.2fs", method, path, e, attempt + 1, delay)
                    await _sleep(delay)
                    attempt += 1
                    continue
                raise connection_error(e, str(request.url)) from e
            if response.status_code < 400:
                return response
            try:
                content = await response.aread()
            except httpx.TransportError:
                content = b""
            finally:
                await response.aclose()
            retry_after = parse_retry_after(response.headers.get("retry-after"))
            if response.status_code in RETRY_STATUSES and attempt < self.max_retries:
                delay = retry_delay(attempt, self.backoff, retry_after)
                log.info("%s %s: HTTP %d; retry %d in %.2fs", method, path, response.status_code, attempt + 1, delay)
                await _sleep(delay)
                attempt += 1
                continue
            raise from_response_content(response.status_code, content, retry_after=retry_after)
