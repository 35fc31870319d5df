"""The synchronous client."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
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
_sleep = time.sleep  # replaced in tests


class Stream:
    """A streamed chat answer: iterate it for the text deltas; afterwards `.completion` holds the whole answer.

    The request is sent when iteration starts, so errors (typed, like `chat`'s) are raised from the loop. Iterate
    once. Leaving the loop early and calling `close()` (or using `with`) cancels the generation on the server.
    """

    def __init__(self, open_response: Callable[[], httpx.Response]) -> None:
        self._open = open_response
        self._state = ChatStreamState()
        self._response: httpx.Response | None = None
        self._iterator: Generator[str, None, None] | None = None
        self._completion: Completion | None = None

    def __iter__(self) -> Iterator[str]:
        if self._iterator is not None:
            raise RuntimeError("a Stream can be iterated only once")
        self._iterator = self._deltas()
        return self._iterator

    def _deltas(self) -> Generator[str, None, None]:
        response = self._response = self._open()
        try:
            for text in response.iter_text():
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
            response.close()

    @property
    def completion(self) -> Completion:
        """The whole answer (text, finish_reason, usage, id, model); available once the stream is exhausted."""
        if self._completion is None:
            raise RuntimeError("the stream has not been read to its end yet")
        return self._completion

    def close(self) -> None:
        """Stop reading and close the connection (the server then cancels the generation)."""
        if self._iterator is not None:
            self._iterator.close()
        if self._response is not None:
            self._response.close()

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class Client:
    """Synchronous client of a vlmserve server.

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
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = normalize_base_url(base_url)
        self.max_retries = max(0, max_retries)
        self.backoff = backoff
        self.model = model
        self._http = httpx.Client(base_url=self.base_url, timeout=as_timeout(timeout),
                                  headers=default_headers(resolve_api_key(api_key)), transport=transport,
                                  **pool_limits(max_connections))

    # ------------------------------------------------------------ public API

    def chat(
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
        response = self._request("POST", "/v1/chat/completions", json=body)
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
    ) -> Stream:
        """Like `chat`, streamed: iterate the returned Stream for text deltas, then read `stream.completion`."""
        body = chat_body(prompt, images=images, model=model or self.model, max_tokens=max_tokens,
                         temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop=stop, system=system,
                         response_format=response_format, extra_body=extra_body, history=history, stream=True)
        return Stream(lambda: self._request("POST", "/v1/chat/completions", json=body, stream=True))

    def generate(
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
        response = self._request("POST", "/v1/generate", data=data, files=files)
        return completion_from_generate(parse_json(response.content))

    def models(self) -> list[str]:
        """The ids of the served models (GET /v1/models)."""
        body = parse_json(self._request("GET", "/v1/models").content)
        return [m["id"] for m in body.get("data", [])]

    def ready(self) -> bool:
        """True if the server is up and its model loaded (GET /ready is 200); False otherwise, also if unreachable."""
        try:
            return self._http.get("/ready").status_code == 200
        except httpx.TransportError:
            return False

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # ------------------------------------------------------------ transport with retries

    def _request(self, method: str, path: str, *, stream: bool = False, **kwargs: Any) -> httpx.Response:
        """Send with retries; returns a 2xx response (streamed responses are left open) or raises a typed error."""
        attempt = 0
        while True:
            request = self._http.build_request(method, path, **kwargs)
            try:
                response = self._http.send(request, stream=stream)
            except httpx.TransportError as e:
                if attempt < self.max_retries and retryable_transport_error(e):
                    delay = retry_delay(attempt, self.backoff, None)
                    log.info("%s %s: %r; retry %d in %.2fs", method, path, e, attempt + 1, delay)
                    _sleep(delay)
                    attempt += 1
                    continue
                raise connection_error(e, str(request.url)) from e
            if response.status_code < 400:
                return response
            try:
                content = response.read()
            except httpx.TransportError:
                content = b""
            finally:
                response.close()
            retry_after = parse_retry_after(response.headers.get("retry-after"))
            if response.status_code in RETRY_STATUSES and attempt < self.max_retries:
                delay = retry_delay(attempt, self.backoff, retry_after)
                log.info("%s %s: HTTP %d; retry %d in %.2fs", method, path, response.status_code, attempt + 1, delay)
                _sleep(delay)
                attempt += 1
                continue
            raise from_response_content(response.status_code, content, retry_after=retry_after)
